"""Paper workflows as functions, shared by the command line and Python users.

- ``train_checkpoint``: train a model by name (or continue a checkpoint), with noise augmentation,
  adversarial losses, low-bit weights or int8 quantization-aware training, into a checkpoint file.
- ``quantize_int8``: a ``qrobust train`` checkpoint to an integer-only int8 file (Jacob et al. 2018):
  quantization-aware checkpoints directly, float ones after calibration on noisy training images.
- ``certified_radii``: the per-layer weight radii that certified ADMM quantization (Weng et al. 2020)
  keeps each layer within, from correctly classified training images.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qrobust.checks import check_count
from qrobust.data import LatticeDataset, dataset_info, load_dataset
from qrobust.errors import QRobustError
from qrobust.models import build_model, count_parameters
from qrobust.models.checkpoint import load_checkpoint, model_metadata, save_checkpoint
from qrobust.quant import (
    QATModel,
    QuantConfig,
    SparsityReport,
    calibrate,
    convert,
    prepare_qat,
    save_int8,
    sparsity_report,
)
from qrobust.quant.admm import certificate_epsilons
from qrobust.smoothing import evenly_spaced
from qrobust.train import TrainConfig, accuracy, load_model, train
from qrobust.train.loop import model_inputs


@dataclass(frozen=True)
class TrainResult:
    """The trained model, its clean accuracy and its accuracy under the training noise (None without
    noise) on ``test_images`` test images, and the sparsity of low-bit weights (None without)."""

    model: nn.Module
    clean: float
    noisy: float | None
    test_images: int
    sparsity: SparsityReport | None


def train_checkpoint(
    output: Path,
    config: TrainConfig,
    *,
    model: str = "cnn",
    model_options: dict[str, Any] | None = None,
    dataset: str = "fashion-mnist",
    init: Path | None = None,
    qat: bool = False,
    input_margin: int = 0,
    train_subset: int | None = None,
    test_subset: int | None = None,
    data_root: Path | None = None,
    resume: bool = False,
    device: str | None = None,
    log: Callable[[str], object] = print,
) -> TrainResult:
    """Train ``model`` (``qrobust.models.build_model``'s name and options) on ``dataset``, or the model and
    weights of the checkpoint ``init``, into the checkpoint ``output`` (rewritten after every epoch; with
    ``resume``, an interrupted run there continues) and measure it on the test split.

    ``qat``: int8 quantization-aware training reading lattice inputs in [-input_margin, 255 + input_margin]
    (a quantization-aware ``init`` keeps its own). ``train_subset``/``test_subset``: seeded subsets of
    that many images. The checkpoint's metadata records the model, its options, the dataset, the noise
    and the seed, and then the accuracies (and the sparsity of low-bit weights). ``device``: where it
    trains (``qrobust.train.train``; default the model's).
    """
    torch.manual_seed(config.seed)
    if init is None:
        info = dataset_info(dataset)
        network, quant_config = build_model(model, info, **(model_options or {})), None
    else:
        network, start = load_model(init)
        model, model_options, info = start.metadata["model"], start.metadata["model_options"], start.dataset_info
        quant_config = start.metadata.get("qat")
    if input_margin and quant_config is not None and quant_config.get("input_margin", 0) != input_margin:
        raise QRobustError(
            f"--init is quantization-aware with input margin {quant_config.get('input_margin', 0)}; --input-margin cannot change it"
        )
    if config.quant != "none" and (qat or quant_config is not None):
        raise QRobustError("--quant (low-bit weights) and --qat (int8) cannot be combined")
    if qat and quant_config is None:
        quant_config = asdict(QuantConfig(input_margin=input_margin))
        network = prepare_qat(network.train(), QuantConfig(**quant_config))
    train_set, test_set = (load_dataset(info.name, split, data_root) for split in ("train", "test"))
    train_set = train_set if train_subset is None else train_set.subset(train_subset, config.seed)
    test_set = test_set if test_subset is None else test_set.subset(test_subset, config.seed)
    kind = "quantization-aware " if quant_config else ""
    log(
        f"{kind}{model} ({count_parameters(network):,} parameters) on {info.name}: "
        f"{len(train_set)} training images, {config.loss} loss, {config.noise} noise sigma {config.sigma}"
        + ("" if config.quant == "none" else f", {config.bits}-bit weights by {config.quant}")
    )
    metadata = model_metadata(
        model,
        model_options or {},
        info,
        sigma=config.sigma,
        noise=config.noise,
        seed=config.seed,
        qat=quant_config,
        init=None if init is None else str(init),
    )
    train(
        network,
        train_set,
        config,
        test_set=test_set,
        checkpoint_path=output,
        metadata=metadata,
        resume=resume,
        device=device,
    )

    clean, method = accuracy(network, test_set), config.noise_method()
    noisy = (
        None
        if method is None
        else accuracy(network, test_set, noise=method, generator=torch.Generator().manual_seed(config.seed))
    )
    checkpoint = load_checkpoint(output)
    checkpoint.metadata["accuracy"] = {
        "clean": clean,
        "noisy": clean if noisy is None else noisy,
        "test_images": len(test_set),
    }
    report = None if config.quant == "none" else sparsity_report(network)
    if report is not None:
        checkpoint.metadata["sparsity"] = asdict(report)
    save_checkpoint(output, checkpoint)
    return TrainResult(network, clean, noisy, len(test_set), report)


@dataclass(frozen=True)
class Int8Result:
    """What ``quantize_int8`` wrote: how (``"qat"`` or ``"ptq"``), the sizes in bytes of the int8 file and
    of the fp32 weights, and the int8 model's clean accuracy and top-1 agreement with the float model."""

    quantization: str
    size: int
    fp32_size: int
    accuracy: float
    agreement: float
    test_images: int


def quantize_int8(
    checkpoint: Path,
    output: Path,
    *,
    calibration_images: int = 512,
    input_margin: int | None = None,
    data_root: Path | None = None,
    seed: int = 0,
) -> Int8Result:
    """Convert the checkpoint to an int8 model file ``output`` (``qrobust.quant.save_int8``, with the
    checkpoint's metadata) and measure it on up to 1000 seeded test images.

    A float checkpoint is calibrated first on ``calibration_images`` seeded training images with the
    noise it was trained with (post-training quantization), reading lattice inputs in
    [-input_margin, 255 + input_margin]; a quantization-aware one keeps the margin it was trained with.
    """
    model, saved = load_model(checkpoint)
    info = saved.dataset_info
    noise = TrainConfig(
        sigma=saved.metadata.get("sigma", 0.0), noise=saved.metadata.get("noise", "gaussian")
    ).noise_method()
    qat = saved.metadata.get("qat")
    if qat is not None and input_margin not in (None, qat.get("input_margin", 0)):
        raise QRobustError(
            f"{checkpoint} was trained quantization-aware with input margin {qat.get('input_margin', 0)}; --input-margin cannot change it"
        )
    if qat is None:
        check_count("calibration images", calibration_images)
        images = load_dataset(info.name, "train", data_root).subset(calibration_images, seed).images
        ptq = prepare_qat(model, QuantConfig(input_margin=input_margin or 0))
        model = calibrate(ptq, model_inputs(images, noise, torch.Generator().manual_seed(seed)))
    if not isinstance(model, QATModel):  # e.g. a mixed-precision checkpoint: ARQ's models are not int8 programs
        raise QRobustError(
            f"{checkpoint} holds a {type(model).__name__}; int8 conversion takes a float or --qat checkpoint"
        )
    int8 = convert(model)
    test_set = load_dataset(info.name, "test", data_root)
    test_set = test_set.subset(min(1000, len(test_set)), seed)
    with torch.no_grad():
        predictions, float_predictions = int8(test_set.images).argmax(1), model(test_set.floats()).argmax(1)
    accuracy = float((predictions == test_set.labels).float().mean())
    agreement = float((predictions == float_predictions).float().mean())
    quantization = "qat" if qat else "ptq"
    metadata = saved.metadata | {"quantization": quantization, "source": str(checkpoint), "int8_accuracy": accuracy}
    size = save_int8(output, int8, metadata)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)  # the fp32 weights alone, without the optimizer state of the checkpoint
    return Int8Result(quantization, size, buffer.getbuffer().nbytes, accuracy, agreement, len(test_set))


def certified_radii(
    model: nn.Module, train_set: LatticeDataset, images: int, percentile: float, log: Callable[[str], object] = print
) -> dict[str, float]:
    """Each layer's certified weight-perturbation radius (``qrobust.quant.admm.certificate_epsilons``):
    the ``percentile`` (0..100) of its certified bounds over ``images`` training images the model
    classifies correctly, chosen evenly among up to 10 * ``images`` evenly spaced candidates."""
    check_count("certify images", images)
    if not 0 <= percentile <= 100:
        raise QRobustError(f"percentile must be in [0, 100], got {percentile:g}")
    candidates = train_set.select(evenly_spaced(len(train_set), min(len(train_set), 10 * images)))
    with torch.no_grad():
        correct = (model(candidates.floats()).argmax(1) == candidates.labels).nonzero().flatten()
    if len(correct) == 0:
        raise QRobustError("the model classifies none of the training images it was certified on correctly")
    chosen = candidates.select(correct[evenly_spaced(len(correct), min(images, len(correct)))])
    log(f"certifying each layer on {len(chosen)} correctly classified training images ...")
    return certificate_epsilons(model, chosen.floats(), chosen.labels, percentile)
