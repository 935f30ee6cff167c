"""The options of a smoothing run, shared by certify and predict and declared once: ``SmoothingOptions``,
added to a command by ``with_smoothing_options``."""

import dataclasses
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any

import typer

from qrobust.checks import check_alpha, check_sigma
from qrobust.cli.common import check_counts, import_model
from qrobust.cli.options import (
    Alpha,
    BatchSize,
    DataRoot,
    Device,
    ModelFactory,
    NumExamples,
    Overwrite,
    Resume,
    Seed,
    Sigma,
    Split,
)
from qrobust.devices import check_device_name
from qrobust.errors import QRobustError
from qrobust.limits import check_limit, check_samples
from qrobust.runner import check_run

SMOOTHING_METHODS = ("float-fp", "float-quant", "int", "lattice")  # qrobust.jobs.METHODS, checked by a test
CheckpointPath = Annotated[
    Path,
    typer.Argument(
        help="Model: a `qrobust train` checkpoint for --method float-fp and lattice, a `qrobust quantize` int8 file for float-quant and int."
    ),
]
Method = Annotated[
    str,
    typer.Option(
        help="Smoothing: float-fp (Gaussian noise, fp32 model), float-quant (Gaussian noise rounded to the integer lattice, int8 model), int (IntRS: discrete noise on the uint8 lattice, int8 model, integer radius table) or lattice (IntRS's noise and sound radius for an fp32 model, which reads (x + noise) / 255); int and lattice are sound in floating point (README)."
    ),
]
NoiseBank = Annotated[
    bool,
    typer.Option(
        help="Draw the noise once (from --seed) and reuse it for every example: faster with int8 models, memory (n0 + n) images."
    ),
]
Fast = Annotated[
    bool,
    typer.Option(
        help="Run the base model on the fast path (frozen TorchScript for fp32, torch's oneDNN int8 kernels for int8) instead of eager fp32 / the integer reference engine."
    ),
]
Backend = Annotated[
    str,
    typer.Option(
        help="Where to run: local (this process) or ray (examples sharded over Ray workers; pip install 'qrobust[ray]')."
    ),
]
Workers = Annotated[int, typer.Option(help="With --backend ray: worker processes, one CPU and one torch thread each.")]
Runtime = Annotated[
    str,
    typer.Option(
        help="Base model runtime: torch (see --fast) or onnxruntime (the model exported to ONNX, as on an edge device; pip install 'qrobust[onnx]')."
    ),
]
Address = Annotated[
    str | None,
    typer.Option(help="With --backend ray: an existing cluster (host:port or auto); default: start a local one."),
]
SmoothingOutput = Annotated[
    Path,
    typer.Option(
        help="TSV to write, a row per example (certify: idx label predict radius correct time; predict: without radius); the run config goes to OUTPUT with suffix .json.",
    ),
]
MemoryLimit = Annotated[
    float | None,
    typer.Option(
        help="GiB the run may use (model file, noise bank, batches), checked before allocating (default: 80% of RAM)."
    ),
]


@dataclass(frozen=True)
class SmoothingOptions:
    """The options of a smoothing run that certify and predict share."""

    checkpoint: CheckpointPath
    sigma: Sigma
    output: SmoothingOutput
    method: Method = "float-fp"
    fast: Fast = True
    noise_bank: NoiseBank = False
    alpha: Alpha = 0.001
    num_examples: NumExamples = 500
    split: Split = "test"
    data_root: DataRoot = None
    batch_size: BatchSize = 256
    seed: Seed = 0
    runtime: Runtime = "torch"
    backend: Backend = "local"
    workers: Workers = 2
    address: Address = None
    model: ModelFactory = None
    overwrite: Overwrite = False
    resume: Resume = False
    memory_limit: MemoryLimit = None
    device: Device = "auto"

    def check(self, counts: dict[str, int]) -> None:
        """Check the plain values (``counts``: the command's own sample counts) and the output file."""
        check_counts(
            {**counts, "--num-examples": self.num_examples, "--batch-size": self.batch_size, "--workers": self.workers},
            self.seed,
        )
        check_sigma(self.sigma)
        check_alpha(self.alpha)
        check_device_name(self.device)
        if self.method not in SMOOTHING_METHODS:
            raise QRobustError(f"--method must be one of {', '.join(SMOOTHING_METHODS)}, got {self.method!r}")
        if self.memory_limit is not None:
            check_limit(self.memory_limit)
        check_samples(max(counts.values()), self.memory_limit)  # before torch loads: --n 10**12 is refused at once
        check_run(self.output, overwrite=self.overwrite, resume=self.resume, backend=self.backend)

    def run(
        self,
        command: str,
        *,
        n: int,
        n0: int = 100,
        settle_radii: tuple[float, ...] | None = None,
        sequential: str = "cs",
        randomized_bound: bool = False,
    ) -> int:
        """Run the certify or predict job of these options; returns the number of examples classified correctly."""
        from qrobust.jobs import SmoothingJob
        from qrobust.runner import run_job

        import_model(self.model)
        job = SmoothingJob(
            command=command,
            checkpoint=str(self.checkpoint),
            method=self.method,
            sigma=self.sigma,
            n=n,
            alpha=self.alpha,
            n0=n0,
            fast=self.fast,
            noise_bank=self.noise_bank,
            batch_size=self.batch_size,
            seed=self.seed,
            split=self.split,
            data_root=None if self.data_root is None else str(self.data_root),
            settle_radii=settle_radii,
            runtime=self.runtime,
            memory_limit=self.memory_limit,
            sequential=sequential,
            randomized_bound=randomized_bound,
            device=self.device,
        )
        job = dataclasses.replace(
            job, device=str(job.resolved_device()), memory_limit=self.memory_limit
        )  # the run config records where it ran
        return run_job(
            job,
            self.output,
            self.num_examples,
            overwrite=self.overwrite,
            resume=self.resume,
            backend=self.backend,
            workers=self.workers,
            address=self.address,
        )


def with_smoothing_options(command: Callable[..., None]) -> Callable[..., None]:
    """``command(options: SmoothingOptions, **own)`` as a typer command that takes the shared options
    (CHECKPOINT, --sigma and --output first, the others after its own) and hands them over as one value."""
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "options"]
    shared = [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in inspect.signature(SmoothingOptions).parameters.values()
    ]
    parameters = [*shared[:3], *(p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own), *shared[3:]]

    @functools.wraps(command)
    def run(**values: Any) -> None:
        command(SmoothingOptions(**{f.name: values.pop(f.name) for f in fields(SmoothingOptions)}), **values)

    run.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in parameters}
    return run
