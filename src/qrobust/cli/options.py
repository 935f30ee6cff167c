"""Options that several commands share, declared once as Annotated aliases (the smoothing-run group of
certify and predict is in ``smoothing_options``).

Help texts and defaults are plain values here, so ``--help`` needs no torch; those that mirror the
library (model names, config defaults) are checked against it by tests/cli/test_package.py.
"""

from pathlib import Path
from typing import Annotated

import typer

MODEL_NAMES = (
    "mlp",
    "cnn",
    "resnet8",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "enresnet8",
    "enresnet20",
    "enresnet56",
    "enresnet110",
    "mobilenetv2",
)
DEFAULT_RADII = "0,0.25,0.5,0.75,1"  # qrobust.smoothing.DEFAULT_RADII
DATASET_NAMES = ("fashion-mnist", "mnist", "cifar10", "cifar100", "svhn", "digits")  # qrobust.data.DATASET_NAMES

DataRoot = Annotated[
    Path | None,
    typer.Option(help="Directory holding dataset files (default: Fashion-MNIST from the Debian package, else ./data)."),
]
ModelFactory = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="Your own model's factory as package.module:function (importable, e.g. on PYTHONPATH), imported so that checkpoints of it load; a checkpoint never imports code itself.",
    ),
]
Sigma = Annotated[float, typer.Option(help="Std of the Gaussian noise, in [0, 1] pixel units (> 0).")]
Alpha = Annotated[float, typer.Option(help="Failure probability of the test, in (0, 1); confidence is 1 - alpha.")]
NumExamples = Annotated[int, typer.Option(help="Number of examples, spread evenly over the split (>= 1).")]
BatchSize = Annotated[
    int,
    typer.Option(
        help="Noisy samples per forward pass (memory vs. speed; it shapes the noise stream, so it is recorded)."
    ),
]
Seed = Annotated[
    int, typer.Option(help="Seed of the noise (>= 0); each example gets its own generator derived from it.")
]
Overwrite = Annotated[bool, typer.Option(help="Replace existing output files instead of refusing.")]
Resume = Annotated[
    bool,
    typer.Option(
        help="Continue an interrupted run with the same settings: keep its complete rows, run only the missing examples."
    ),
]
Split = Annotated[str, typer.Option(help="Dataset split: train or test.")]
Device = Annotated[
    str,
    typer.Option(
        help="Where the float model runs: auto (a GPU when torch sees one, else the CPU), cpu, cuda, cuda:N or mps; int8 models (and int8 inference: float-quant, int) stay on the CPU. Seeded runs reproduce per kind of device."
    ),
]
Radii = Annotated[str, typer.Option(help="Comma-separated l2 radii in [0, 1] pixel units for the table.")]
