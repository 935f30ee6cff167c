"""Shared fixtures for qrobust.quant: small seeded models, quantized once per session, no downloads."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from qrobust.data.base import DatasetInfo
from qrobust.models import build_model
from qrobust.quant import Int8Model, QATModel, QuantConfig, calibrate, convert, prepare_qat
from qrobust.smoothing import IntRS

# Registered model the int8 engine runs -> a small input shape it accepts (ResNets pool globally, so 8x8
# keeps them fast). Other registered models (the noise-injecting EnResNets) must be refused by prepare_qat.
SHAPES = {
    "mlp": (1, 28, 28),
    "cnn": (1, 28, 28),
    "resnet8": (3, 8, 8),
    "resnet20": (3, 8, 8),
    "resnet32": (3, 8, 8),
    "resnet44": (3, 8, 8),
    "resnet56": (3, 8, 8),
    "resnet110": (3, 8, 8),
}

QUANTIZABLE = tuple(SHAPES)


def make_info(shape: tuple[int, int, int], num_classes: int = 10) -> DatasetInfo:
    """Statistics far from (0, 1), so a wrong Normalize fold or padding shows."""
    channels = shape[0]
    return DatasetInfo(
        name=f"fake{'x'.join(map(str, shape))}",
        shape=shape,
        classes=tuple(f"c{i}" for i in range(num_classes)),
        mean=tuple(0.3 + 0.15 * c for c in range(channels)),
        std=tuple(0.2 + 0.05 * c for c in range(channels)),
    )


def lattice_images(n: int, shape: tuple[int, ...], seed: int, sigma: float = 0.25) -> torch.Tensor:
    """Smooth random images plus Gaussian noise of std ``sigma`` (in [0, 1] units), on the uint8 lattice."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, shape[0], 4, 4, generator=generator)
    smooth = nn.functional.interpolate(coarse, size=shape[1:], mode="bilinear", align_corners=False)
    noisy = smooth + sigma * torch.randn(smooth.shape, generator=generator)
    return (noisy * 255).round().clamp(0, 255).to(torch.uint8)


def intrs_noisy(images: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    """``images`` plus IntRS's discrete noise of std ``sigma`` (in [0, 1] units): unclipped int16 lattice values."""
    return IntRS(sigma).perturb(images, torch.Generator().manual_seed(seed))


def fit_batchnorm(model: nn.Module, images: torch.Tensor, seed: int) -> None:
    """Random BatchNorm affine parameters and running statistics measured on ``images``, as after training.

    Folding is then really tested (gamma, beta, mean and variance all matter), and activations stay
    normalised through deep ResNets instead of growing without bound as in a freshly initialised net.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            gain = 0.2 if name.endswith("bn2") else 1.0  # residual branches end small, as in trained ResNets
            module.weight.data = gain * (0.5 + torch.rand(module.num_features, generator=generator))
            module.bias.data = 0.2 * torch.randn(module.num_features, generator=generator)
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the batches below
    model.train()
    with torch.no_grad():
        model(images.float() / 255)
    model.eval()


def center_logits(model: nn.Module, images: torch.Tensor) -> None:
    """Give the last Linear layer the bias that centres every logit over ``images``.

    Random networks otherwise send almost every image to one class, which would make prediction
    agreement trivially 100%; centred logits spread predictions over the classes, with small margins.
    """
    last = [module for module in model.modules() if isinstance(module, nn.Linear)][-1]
    features = []
    handle = last.register_forward_hook(lambda module, args, output: features.append(args[0]))
    with torch.no_grad():
        model(images.float() / 255)
        handle.remove()
        last.bias.copy_(-features[0].mean(0) @ last.weight.t())


@dataclass(frozen=True)
class Quantized:
    """One registered model at every stage: float, calibrated QAT, integer, and its test images."""

    name: str
    model: nn.Module
    qat: QATModel
    int8: Int8Model
    images: torch.Tensor  # uint8 (N, C, H, W), noisy


@functools.cache
def _quantized(name: str, n: int = 256, margin: int = 0) -> Quantized:
    shape = SHAPES[name]
    torch.manual_seed(0)
    model = build_model(name, make_info(shape)).eval()
    fit_batchnorm(model, lattice_images(256, shape, seed=4), seed=1)
    center_logits(model, lattice_images(256, shape, seed=4))
    calibration = lattice_images(256, shape, seed=2)
    if margin:  # a wide input range is for large IntRS noise: calibrate on it, unclipped
        calibration = intrs_noisy(calibration, 0.5, seed=2)
    qat = calibrate(prepare_qat(model, QuantConfig(input_margin=margin)), calibration)
    return Quantized(name, model, qat, convert(qat), lattice_images(n, shape, seed=3))


@pytest.fixture(scope="session")
def quantized():
    """quantized(name, n=256, margin=0) -> Quantized (``margin``: QuantConfig.input_margin), built once per session."""
    return _quantized
