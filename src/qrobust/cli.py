"""The ``qrobust`` command line: train, certify, predict, analyze.

User errors (bad values, missing or corrupt files) end in one ``error:`` line and exit code 2; results
already written stay as they are.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console

from qrobust.data import dataset_info, load_dataset
from qrobust.errors import QRobustError
from qrobust.models import build_model, count_parameters
from qrobust.models.checkpoint import load_checkpoint, model_metadata, save_checkpoint
from qrobust.progress import progress_bar
from qrobust.smoothing import (
    CERTIFY_HEADER,
    DEFAULT_RADII,
    PREDICT_HEADER,
    FloatRS,
    SmoothedClassifier,
    certify_examples,
    evenly_spaced,
    predict_examples,
    read_certify_tsv,
    summarize_rows,
)
from qrobust.smoothing.confidence import check_alpha, check_count
from qrobust.train import TrainConfig, accuracy, train

app = typer.Typer(
    help="Small, fast and provably robust neural networks: train, certify and analyze.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()

DataRoot = Annotated[
    Path | None,
    typer.Option(help="Directory holding dataset files (default: Fashion-MNIST from the Debian package, else ./data)."),
]
Sigma = Annotated[float, typer.Option(help="Std of the Gaussian noise, in [0, 1] pixel units (> 0).")]
Alpha = Annotated[float, typer.Option(help="Failure probability of the test, in (0, 1); confidence is 1 - alpha.")]
NumExamples = Annotated[int, typer.Option(help="Number of examples, spread evenly over the split (>= 1).")]
BatchSize = Annotated[int, typer.Option(help="Noisy samples per forward pass (memory vs. speed; it shapes the noise stream, so it is recorded).")]
Seed = Annotated[int, typer.Option(help="Seed of the noise; each example gets its own generator derived from it.")]
Overwrite = Annotated[bool, typer.Option(help="Replace an existing output file instead of refusing.")]


@app.command("train")
def train_command(
    output: Annotated[Path, typer.Option(help="Checkpoint file to write (.pt); rewritten after every epoch.")],
    dataset: Annotated[str, typer.Option(help="Dataset name: fashion-mnist, mnist, cifar10, cifar100, svhn, digits.")] = "fashion-mnist",
    data_root: DataRoot = None,
    model: Annotated[str, typer.Option(help="Model name: mlp, cnn, resnet20, resnet32, resnet44, resnet56, resnet110.")] = "cnn",
    model_option: Annotated[list[str] | None, typer.Option(help="Model option KEY=VALUE, repeatable (e.g. depth=4 for mlp).")] = None,
    sigma: Annotated[float, typer.Option(help="Std of Gaussian noise augmentation, in [0, 1] pixel units (0: none).")] = 0.0,
    epochs: Annotated[int, typer.Option(help="Number of epochs.")] = 90,
    batch_size: Annotated[int, typer.Option(help="Images per SGD step.")] = 256,
    lr: Annotated[float, typer.Option(help="Initial learning rate.")] = 0.1,
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = 0.9,
    weight_decay: Annotated[float, typer.Option(help="L2 weight decay.")] = 1e-4,
    lr_step: Annotated[int, typer.Option(help="Epochs between learning-rate drops.")] = 30,
    lr_gamma: Annotated[float, typer.Option(help="Factor applied to the learning rate at each drop.")] = 0.1,
    augment: Annotated[bool, typer.Option(help="Use the dataset's standard augmentation (crop + flip for CIFAR).")] = True,
    train_subset: Annotated[int | None, typer.Option(help="Train on this many training images (seeded subset).")] = None,
    test_subset: Annotated[int | None, typer.Option(help="Evaluate on this many test images (seeded subset).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of initialisation, shuffling, augmentation and noise.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted run saved in OUTPUT.")] = False,
    overwrite: Overwrite = False,
) -> None:
    """Train a classifier with Gaussian noise augmentation and save a checkpoint."""
    config = TrainConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay,
        lr_step=lr_step, lr_gamma=lr_gamma, sigma=sigma, augment=augment, seed=seed,
    )  # fmt: skip
    if output.exists() and not (resume or overwrite):
        raise QRobustError(f"{output} exists; pass --resume to continue it or --overwrite to replace it")
    options = _parse_options(model_option or [])
    info = dataset_info(dataset)
    torch.manual_seed(seed)
    network = build_model(model, info, **options)
    train_set = _subset(load_dataset(dataset, "train", data_root), train_subset, seed)
    test_set = _subset(load_dataset(dataset, "test", data_root), test_subset, seed)
    console.print(f"{model} ({count_parameters(network):,} parameters) on {dataset}: {len(train_set)} training images, sigma {sigma}")
    metadata = model_metadata(model, options, info, sigma=sigma, seed=seed)
    train(network, train_set, config, test_set=test_set, checkpoint_path=output, metadata=metadata, resume=resume)

    clean = accuracy(network, test_set)
    noisy = accuracy(network, test_set, noise=FloatRS(sigma), generator=torch.Generator().manual_seed(seed)) if sigma > 0 else clean
    checkpoint = load_checkpoint(output)
    checkpoint.metadata["accuracy"] = {"clean": clean, "noisy": noisy, "test_images": len(test_set)}
    save_checkpoint(output, checkpoint)
    console.print(f"test accuracy: clean {100 * clean:.2f}%, with noise sigma={sigma}: {100 * noisy:.2f}%  -> {output}")


CheckpointPath = Annotated[Path, typer.Argument(help="Checkpoint written by `qrobust train`.")]
Split = Annotated[str, typer.Option(help="Dataset split: train or test.")]


@app.command("certify")
def certify_command(
    checkpoint: CheckpointPath,
    sigma: Sigma,
    output: Annotated[Path, typer.Option(help="TSV to write (idx label predict radius correct time); the run config goes to OUTPUT with suffix .json.")],
    n0: Annotated[int, typer.Option(help="Noisy samples to guess the top class (>= 1).")] = 100,
    n: Annotated[int, typer.Option(help="Noisy samples to bound its probability (>= 1).")] = 100_000,
    alpha: Alpha = 0.001,
    num_examples: NumExamples = 500,
    split: Split = "test",
    data_root: DataRoot = None,
    batch_size: BatchSize = 256,
    seed: Seed = 0,
    overwrite: Overwrite = False,
) -> None:
    """Certify l2 robustness of the Gaussian-smoothed model (Cohen et al. 2019); radii are in [0, 1] pixel units."""
    method = FloatRS(sigma)
    check_count("n0", n0)
    check_count("n", n)
    check_alpha(alpha)
    smoothed, data, indices, metadata = _prepare(checkpoint, method, num_examples, split, data_root, batch_size, output, overwrite)
    _write_config(output, {"command": "certify", "checkpoint": str(checkpoint), "method": method.name, "sigma": sigma,
                           "n0": n0, "n": n, "alpha": alpha, "split": split, "indices": indices, "seed": seed,
                           "batch_size": batch_size, "model": metadata})  # fmt: skip
    rows = certify_examples(smoothed, data, indices, n0=n0, n=n, alpha=alpha, seed=seed)
    _write_rows(output, CERTIFY_HEADER, rows, len(indices), "certify")
    summary = summarize_rows(read_certify_tsv(output))
    console.print(f"certified accuracy at radius 0: {100 * summary.certified_accuracy[0]:.1f}%, "
                  f"ACR {summary.average_certified_radius:.3f}  -> {output}")  # fmt: skip


@app.command("predict")
def predict_command(
    checkpoint: CheckpointPath,
    sigma: Sigma,
    output: Annotated[Path, typer.Option(help="TSV to write (idx label predict correct time); the run config goes to OUTPUT with suffix .json.")],
    n: Annotated[int, typer.Option(help="Noisy samples per example (>= 1).")] = 100_000,
    alpha: Alpha = 0.001,
    num_examples: NumExamples = 500,
    split: Split = "test",
    data_root: DataRoot = None,
    batch_size: BatchSize = 256,
    seed: Seed = 0,
    overwrite: Overwrite = False,
) -> None:
    """Predict with the smoothed model, abstaining (-1) when the top two classes are not separated at level alpha."""
    method = FloatRS(sigma)
    check_count("n", n)
    check_alpha(alpha)
    smoothed, data, indices, metadata = _prepare(checkpoint, method, num_examples, split, data_root, batch_size, output, overwrite)
    _write_config(output, {"command": "predict", "checkpoint": str(checkpoint), "method": method.name, "sigma": sigma,
                           "n": n, "alpha": alpha, "split": split, "indices": indices, "seed": seed,
                           "batch_size": batch_size, "model": metadata})  # fmt: skip
    rows = predict_examples(smoothed, data, indices, n=n, alpha=alpha, seed=seed)
    correct = _write_rows(output, PREDICT_HEADER, rows, len(indices), "predict")
    console.print(f"smoothed accuracy {100 * correct / len(indices):.1f}%  -> {output}")


@app.command("analyze")
def analyze_command(
    results: Annotated[list[Path], typer.Argument(help="Certification TSVs written by `qrobust certify`.")],
    radii: Annotated[str, typer.Option(help="Comma-separated l2 radii in [0, 1] pixel units for the table.")] = ",".join(f"{r:g}" for r in DEFAULT_RADII),
    plot: Annotated[Path | None, typer.Option(help="PNG file for the plot of certified accuracy against radius.")] = None,
    label: Annotated[list[str] | None, typer.Option(help="Name of each run in table and plot (default: file stem), repeatable.")] = None,
) -> None:
    """Certified accuracy at radii, average certified radius (ACR) and certified percentage of one or more runs."""
    from qrobust.report import plot_certified_accuracy, summary_table  # matplotlib is slow to import

    at = _parse_radii(radii)
    names = label or [path.stem for path in results]
    if len(names) != len(results):
        raise QRobustError(f"got {len(names)} --label values for {len(results)} result files")
    runs = {name: read_certify_tsv(path) for name, path in zip(names, results, strict=True)}
    console.print(summary_table({name: summarize_rows(rows, at) for name, rows in runs.items()}))
    if plot is not None:
        console.print(f"plot -> {plot_certified_accuracy(runs, plot)}")


def _prepare(checkpoint: Path, method, num_examples, split, data_root, batch_size, output: Path, overwrite: bool):
    """The smoothed model, the data and the example indices, checked before any output file is touched."""
    if output.exists() and not overwrite:
        raise QRobustError(f"{output} exists; pass --overwrite to replace it")
    saved = load_checkpoint(checkpoint)
    data = load_dataset(saved.dataset_info.name, split, data_root)
    indices = evenly_spaced(len(data), num_examples)
    smoothed = SmoothedClassifier(saved.build(), saved.dataset_info.num_classes, method, batch_size)
    return smoothed, data, indices, saved.metadata


def _write_rows(output: Path, header: str, rows: Iterator, total: int, task: str) -> int:
    """Write rows to the TSV ``output`` as they come (flushed each), with a progress bar; returns the number correct."""
    correct = 0
    with output.open("w") as table, progress_bar() as bar:
        print(header, file=table, flush=True)
        progress = bar.add_task(task, total=total, status="")
        for done, row in enumerate(rows, start=1):
            print(row.to_line(), file=table, flush=True)
            correct += row.correct
            bar.update(progress, advance=1, status=f"correct {correct}/{done}")
    return correct


def _write_config(output: Path, run_config: dict[str, Any]) -> None:
    """The full run config (with the model's metadata) next to the results, so a run can be reproduced."""
    output.parent.mkdir(parents=True, exist_ok=True)
    config = run_config | {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "argv": sys.argv}
    output.with_suffix(".json").write_text(json.dumps(config, indent=2) + "\n")


def _subset(data, size: int | None, seed: int):
    return data if size is None else data.subset(size, seed)


def _parse_options(pairs: list[str]) -> dict[str, Any]:
    """KEY=VALUE strings to a dict; values are parsed as JSON when they can be (numbers, booleans)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise QRobustError(f"model option must look like KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _parse_radii(text: str) -> tuple[float, ...]:
    try:
        radii = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise QRobustError(f"radii must be comma-separated numbers, got {text!r}") from None
    if any(not r >= 0 for r in radii):
        raise QRobustError(f"radii must be >= 0, got {text!r}")
    return radii


def main() -> None:
    """Entry point of the ``qrobust`` console script."""
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as error:  # usage errors: unknown option, bad type, missing argument
        _fail(error.format_message(), getattr(error, "exit_code", 2))
    except (QRobustError, ValueError, OSError) as error:
        _fail(str(error), 2)
    except (KeyboardInterrupt, typer.Abort):
        _fail("interrupted", 130)
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str, code: int) -> None:
    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    sys.exit(code)
