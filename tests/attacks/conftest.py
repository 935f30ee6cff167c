"""Fixtures for qrobust.attacks: small models trained once per session, linear models with known answers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from qrobust.attacks import FGSM, PGD, Attack, CarliniWagnerL2
from qrobust.data import LatticeDataset, load_dataset
from qrobust.errors import DatasetNotFoundError
from qrobust.models import build_model
from qrobust.quant import Int8Model, QATModel, calibrate, convert, prepare_qat
from qrobust.train import TrainConfig, train


@dataclass(frozen=True)
class Trained:
    """A model trained without any defence, and held-out images to attack."""

    model: nn.Module
    train_set: LatticeDataset
    images: torch.Tensor  # float (N, C, H, W) in [0, 1]
    labels: torch.Tensor  # int64 (N,)


def _train(name: str, train_set: LatticeDataset, test_set: LatticeDataset, config: TrainConfig, **options) -> Trained:
    torch.manual_seed(0)
    model = build_model(name, train_set.info, **options)
    train(model, train_set, config, progress=False)
    return Trained(model.eval(), train_set, test_set.floats(), test_set.labels)


@pytest.fixture(scope="session")
def digits() -> Trained:
    """A two-layer MLP on scikit-learn's 8x8 digits (about 98% test accuracy), 200 test images; ~1 s."""
    train_set, test_set = load_dataset("digits", "train"), load_dataset("digits", "test").subset(200, seed=0)
    return _train("mlp", train_set, test_set, TrainConfig(epochs=10, batch_size=32, lr=0.05, seed=0), depth=2, width=64)


@pytest.fixture(scope="session")
def fashion() -> Trained:
    """The default MLP after 12 epochs on 6,000 Fashion-MNIST images (about 83% test accuracy), 500 test
    images; ~4 s. Skips the test when Fashion-MNIST is not installed."""
    try:
        train_set = load_dataset("fashion-mnist", "train").subset(6000, seed=0)
        test_set = load_dataset("fashion-mnist", "test").subset(500, seed=0)
    except DatasetNotFoundError as error:
        pytest.skip(f"Fashion-MNIST is not installed: {error}")
    config = TrainConfig(epochs=12, batch_size=64, lr=0.05, weight_decay=0.0, seed=0)
    return _train("mlp", train_set, test_set, config)


@dataclass(frozen=True)
class Quantized:
    """The digits MLP fake-quantized and calibrated (QAT twin), and its integer-only conversion."""

    qat: QATModel
    int8: Int8Model


@pytest.fixture(scope="session")
def digits_quantized(digits) -> Quantized:
    qat = calibrate(prepare_qat(digits.model), digits.train_set.images[:500]).eval()
    return Quantized(qat, convert(qat))


class Linear(nn.Module):
    """Logits W x + b on the flattened image: the minimal adversarial perturbation is known in closed form.

    For class y and another class j the boundary is the hyperplane (w_y - w_j) x + b_y - b_j = 0, at lp
    distance (z_y - z_j) / ||w_y - w_j||_q from x (q the dual norm: 1 for l_inf, 2 for l2), as long as the
    box [0, 1] does not get in the way; the minimal distance is the minimum over j.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)  # (K, D)
        self.bias = nn.Parameter(bias)  # (K,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.t() + self.bias  # (N, K)

    def distance(self, x: torch.Tensor, norm: str) -> torch.Tensor:
        """The exact lp distance (N,) from each image to the nearest image of another class than its own."""
        with torch.no_grad():
            logits = self(x)  # (N, K)
            y = logits.argmax(1)
            gaps = logits.gather(1, y[:, None]) - logits  # (N, K), z_y - z_j
            differences = self.weight[y][:, None, :] - self.weight[None]  # (N, K, D), w_y - w_j
            dual = differences.abs().sum(2) if norm == "inf" else differences.norm(dim=2)  # (N, K)
            distances = gaps / dual
            distances[torch.arange(len(y)), y] = float("inf")
            return distances.min(1).values


def linear_problem(num_classes: int, n: int = 400, seed: int = 0) -> tuple[Linear, torch.Tensor, torch.Tensor]:
    """A random linear classifier on 1x4x4 images whose classes meet near the grey image, and images in
    [0.3, 0.7] labelled by it: distances to the boundary spread from 0 to about 0.2, and the box [0, 1]
    is farther away than that."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_classes, 16, generator=generator)
    model = Linear(weight, -0.5 * weight.sum(1) + 0.05 * torch.randn(num_classes, generator=generator))
    x = 0.3 + 0.4 * torch.rand(n, 1, 4, 4, generator=generator)
    with torch.no_grad():
        return model, x, model(x).argmax(1)


class RoundsInput(nn.Module):
    """``model`` on the input rounded to the uint8 lattice, without a straight-through estimator: its input
    gradient is exactly zero, the textbook case of gradient masking."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(torch.round(x * 255) / 255)


# Every attack, configured to be fast; parametrise over these to test what all attacks must do.
ATTACKS: dict[str, Callable[[nn.Module], Attack]] = {
    "fgsm": lambda model: FGSM(model, 0.1),
    "ifgsm": lambda model: PGD(model, eps=0.1, step_size=0.01, steps=20, random_start=False),
    "pgd-inf": lambda model: PGD(model, eps=0.1, step_size=0.025, steps=10, generator=torch.Generator().manual_seed(0)),
    "pgd-2": lambda model: PGD(
        model, norm="2", eps=1.0, step_size=0.25, steps=10, generator=torch.Generator().manual_seed(0)
    ),
    "cw": lambda model: CarliniWagnerL2(model, steps=30, search_steps=3),
}


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` on float images."""
    with torch.no_grad():
        return (model(images).argmax(1) == labels).float().mean().item()
