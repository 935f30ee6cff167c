"""Certify and predict jobs: a run's settings as one value that any process can rebuild and run.

The command line builds a ``SmoothingJob`` and runs it here, on this process or sharded over Ray
workers (``pip install qrobust[ray]``). Every example has its own noise generator
(``example_generator(seed, index)``) and a noise bank depends only on the seed, so the rows do not
depend on which process certified which example: a Ray run equals a local run row for row, and a
resumed run equals an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, cast

import torch
from torch import nn

from qrobust.data import DatasetInfo, LatticeDataset, load_dataset
from qrobust.devices import check_device_name, require_cpu, resolve_device
from qrobust.errors import CheckpointError, QRobustError
from qrobust.limits import check_limit, check_memory, check_samples
from qrobust.models.inference import freeze_for_inference
from qrobust.quant import Int8Model, fast_backend, load_int8
from qrobust.smoothing import (
    FloatRS,
    FloatRSQuant,
    IntRS,
    LatticeRS,
    SmoothedClassifier,
    SmoothingMethod,
    certify_examples,
    predict_examples,
)
from qrobust.smoothing.adaptive import check_radii, check_sequential
from qrobust.smoothing.confidence import check_alpha, check_count
from qrobust.smoothing.records import CertifyRow, PredictRow
from qrobust.train import load_model

METHODS: dict[str, Callable[[float], SmoothingMethod]] = {
    method.name: method for method in (FloatRS, FloatRSQuant, IntRS, LatticeRS)
}
COMMANDS = ("certify", "predict")
RUNTIMES = ("torch", "onnxruntime")


@dataclass(frozen=True)
class SmoothingJob:
    """The settings of one certify or predict run (everything but which examples).

    ``n0`` is the selection sample count of certify (unused by predict); ``settle_radii`` makes certify
    adaptive (``qrobust.smoothing.adaptive``: at most ``n`` samples per example, stopping once these
    radii are decided) with the sequential test ``sequential`` ("cs", the confidence sequence, or
    "union", the union-bound schedule, for comparison); ``randomized_bound`` makes fixed-n certify use
    the randomized Clopper-Pearson bound, its coin seeded by ``seed`` and the example index
    (``SmoothedClassifier.certificate`` says what it guarantees); ``runtime`` "onnxruntime" runs the
    base model exported to ONNX (``qrobust.quant.export``) instead of on torch (where ``fast`` picks
    the path). ``method`` picks the checkpoint kind: an fp32 checkpoint for "float-fp" and "lattice", an
    int8 one for "float-quant" and "int" (``SmoothingMethod.model_kind``). ``device`` (auto, cpu, cuda,
    cuda:N, mps; resolved when the job is opened, see ``resolved_device``) is where an fp32 model runs
    and its noise is drawn; int8 models and the onnxruntime runtime run on the CPU only ("auto" picks it
    for them). Noise streams differ per device, so a seed reproduces a run on the same kind of device.

    ``memory_limit`` (GiB; None: the default of ``qrobust.limits``) bounds what the job may allocate: n is
    checked when the job is made, the model file, the noise bank and a batch when it is opened, each
    before it is allocated. It is a bound of this process, not a setting of the results, so it is not a
    field: it stays out of ``asdict`` (the run config) and a resumed run may use another.
    """

    command: str
    checkpoint: str
    method: str
    sigma: float
    n: int
    alpha: float
    n0: int = 100
    fast: bool = True
    noise_bank: bool = False
    batch_size: int = 256
    seed: int = 0
    split: str = "test"
    data_root: str | None = None
    settle_radii: tuple[float, ...] | None = None
    runtime: str = "torch"
    memory_limit: InitVar[float | None] = None
    # set per instance in __post_init__; a ClassVar so that it is no field (asdict is the run config)
    _memory_limit: ClassVar[float | None] = None
    sequential: str = field(default="cs", kw_only=True)
    randomized_bound: bool = field(default=False, kw_only=True)
    device: str = field(default="cpu", kw_only=True)

    def __post_init__(self, memory_limit: float | None) -> None:
        if self.command not in COMMANDS:
            raise ValueError(f"command must be one of {', '.join(COMMANDS)}, got {self.command!r}")
        if self.runtime not in RUNTIMES:
            raise QRobustError(f"runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if self.method not in METHODS:
            raise QRobustError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        METHODS[self.method](self.sigma)  # validates sigma
        for name in ("n", "n0", "batch_size"):
            check_count(name, getattr(self, name))
        check_alpha(self.alpha)
        check_device_name(self.device)
        check_sequential(self.sequential)
        if self.settle_radii is not None:
            check_radii(self.settle_radii)
        if self.randomized_bound and (self.command != "certify" or self.settle_radii is not None):
            raise QRobustError("randomized_bound applies to fixed-n certify only (not predict, not settle_radii)")
        object.__setattr__(self, "_memory_limit", None if memory_limit is None else check_limit(memory_limit))
        most = max(self.n0, self.n) if self.command == "certify" else self.n
        check_samples(most, self._memory_limit)

    def resolved_device(self) -> torch.device:
        """Where the base model runs: ``device`` resolved here, "auto" being the CPU for int8 models and
        the onnxruntime runtime; QRobustError when it is absent or such a model is asked to leave the CPU."""
        cpu_only = METHODS[self.method](self.sigma).model_kind == "int8" or self.runtime == "onnxruntime"
        device = resolve_device("cpu" if cpu_only and self.device == "auto" else self.device)
        if cpu_only:
            what = "the onnxruntime runtime" if self.runtime == "onnxruntime" else f"{self.method} on an int8 model"
            require_cpu(device, what)
        return device

    def open(self) -> tuple[SmoothedClassifier, LatticeDataset, dict[str, Any]]:
        """The smoothed classifier, the dataset split and the model's metadata, read from the files.

        The fp32 fast path (``freeze_for_inference``) is taken on the CPU; on an accelerator the eager
        model runs there."""
        device = self.resolved_device()
        smoothing = METHODS[self.method](self.sigma)
        int8 = smoothing.model_kind == "int8"
        model: nn.Module
        if int8:
            int8_file = load_int8(self.checkpoint, self._memory_limit)
            if "dataset" not in int8_file.metadata:
                raise CheckpointError(
                    f"{self.checkpoint} does not say which dataset its model reads (no 'dataset' in its metadata): "
                    "save it with `qrobust quantize`, or with save_int8(path, model, {'dataset': dataclasses.asdict(info)})"
                )
            info, metadata, model = (
                DatasetInfo.from_dict(int8_file.metadata["dataset"]),
                int8_file.metadata,
                int8_file.model,
            )
        else:
            model, checkpoint = load_model(self.checkpoint, self._memory_limit)
            info, metadata = checkpoint.dataset_info, checkpoint.metadata
        self._check_memory(model, info.shape, smoothing)
        base: nn.Module
        if self.runtime == "onnxruntime":
            try:
                from qrobust.quant.export import (
                    onnx_runtime_model,  # onnx is an optional extra
                )
            except ImportError:
                raise QRobustError("the onnxruntime runtime needs onnx: pip install 'qrobust[onnx]'") from None
            base = onnx_runtime_model(model if int8 else self.checkpoint)
        elif not self.fast or device.type != "cpu":
            base = model.to(device)
        else:
            example = torch.rand(self.batch_size, *info.shape)
            base = fast_backend(cast(Int8Model, model)) if int8 else freeze_for_inference(model, example)
        data = load_dataset(info.name, self.split, None if self.data_root is None else Path(self.data_root))
        bank_seed = self.seed if self.noise_bank else None
        smoothed = SmoothedClassifier(base, info.num_classes, smoothing, self.batch_size, bank_seed, device=device)
        return smoothed, data, metadata

    def _check_memory(self, model: nn.Module, shape: tuple[int, ...], smoothing: SmoothingMethod) -> None:
        """Refuse a batch or a noise bank above the memory limit, before any is allocated.

        Per noisy sample a batch holds the noise, the noisy input and a float copy (counted as three
        float32 images) and the model's activations: three times its largest module output on one sample
        (an input, an output and a skip connection alive at once), counted at 8 bytes per value, the
        widest accumulator of an int8 model; this errs on the high side by about 2x for float models.
        """
        image, generator = torch.zeros(1, *shape, dtype=torch.uint8), torch.Generator().manual_seed(0)
        activations = (
            3 * 8 * _largest_output(model, smoothing.apply(image, smoothing.sample_noise(image.shape, generator)))
        )
        batch = self.batch_size * (3 * 4 * image.numel() + activations)
        check_memory(f"a batch of {self.batch_size:,} noisy samples", batch, self._memory_limit, "--batch-size")
        if self.noise_bank:
            rows = self.n + (self.n0 if self.command == "certify" else 0)
            bank = rows * image.numel() * smoothing.sample_noise((1,), generator).element_size()
            what = f"a noise bank of {rows:,} noise images of {'x'.join(map(str, shape))}"
            check_memory(what, bank, self._memory_limit, "--n (or leave out --noise-bank)")

    def rows(
        self, smoothed: SmoothedClassifier, data: LatticeDataset, indices: Sequence[int]
    ) -> Iterator[CertifyRow | PredictRow]:
        """Run the job on ``data`` at ``indices``, one row per example in order."""
        if self.command == "certify":
            return certify_examples(
                smoothed,
                data,
                indices,
                n0=self.n0,
                n=self.n,
                alpha=self.alpha,
                seed=self.seed,
                settle_radii=self.settle_radii,
                sequential=self.sequential,
                randomized_bound=self.randomized_bound,
            )
        return predict_examples(smoothed, data, indices, n=self.n, alpha=self.alpha, seed=self.seed)


def _largest_output(model: nn.Module, sample: torch.Tensor) -> int:
    """The number of values in the largest tensor that ``model`` or any of its modules outputs on ``sample``."""
    sizes = [sample.numel()]

    def record(module: nn.Module, args: tuple, output: object) -> None:
        if isinstance(output, torch.Tensor):
            sizes.append(output.numel())

    handles = [module.register_forward_hook(record) for module in model.modules()]
    try:
        with torch.inference_mode():
            model(sample)
    finally:
        for handle in handles:
            handle.remove()
    return max(sizes)


def run_ray(
    job: SmoothingJob, indices: Sequence[int], workers: int, address: str | None = None, chunk: int = 4
) -> Iterator[CertifyRow | PredictRow]:
    """Run ``job`` on Ray: ``workers`` actors (one CPU and one torch thread each) load the model once
    and take chunks of ``chunk`` examples; rows come back in index order as soon as every earlier
    chunk is done, so the output can be streamed (and resumed) like a local run's.

    Ray starts a local cluster unless ``address`` names an existing one (``"auto"`` or host:port).
    """
    try:
        import ray
        from ray.util import ActorPool
    except ImportError:
        raise QRobustError("the ray backend needs Ray: pip install 'qrobust[ray]'") from None
    check_count("workers", workers)
    check_count("chunk", chunk)
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    worker = ray.remote(num_cpus=1)(_Worker)
    pool = ActorPool([worker.remote(job) for _ in range(workers)])
    chunks = [list(indices[start : start + chunk]) for start in range(0, len(indices), chunk)]
    for rows in pool.map(lambda actor, part: actor.run.remote(part), chunks):  # in submission order
        yield from rows


class _Worker:
    """A Ray actor holding one opened job; it runs chunks of examples on a single torch thread."""

    def __init__(self, job: SmoothingJob) -> None:
        torch.set_num_threads(1)
        self.job = job
        self.smoothed, self.data, _ = job.open()

    def run(self, indices: list[int]) -> list[CertifyRow | PredictRow]:
        return list(self.job.rows(self.smoothed, self.data, indices))
