"""Shared fixtures: small, seeded, download-free."""

import pytest
import torch
from torch import nn

from qrobust.data import DatasetInfo

# One thread for the whole suite: float reductions then do not depend on the core count (trained models
# and thresholds are the same on every machine), and many small ops do not pay for waking a second
# OpenMP thread each (on a loaded 2-core machine that made some files 10x slower).
torch.set_num_threads(1)


class LinearBinary(nn.Module):
    """Base classifier with logits (0, w.x + b): class 1 iff w.x + b > 0.

    Under N(0, sigma^2 I) noise, P[f(x + e) = 1] = Phi((w.x + b) / (sigma ||w||)) exactly, so the
    smoothed classifier's true l2 radius is |w.x + b| / ||w||.
    """

    def __init__(self, weight: torch.Tensor, bias: float):
        super().__init__()
        self.register_buffer("weight", weight.flatten())
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = x.flatten(1) @ self.weight + self.bias  # (B,)
        return torch.stack([torch.zeros_like(score), score], dim=1)  # (B, 2)

    def margin(self, x: torch.Tensor) -> float:
        return float(x.flatten() @ self.weight + self.bias)


@pytest.fixture
def linear_binary():
    weight = torch.tensor([0.6, -0.8, 0.0, 0.0])  # ||w|| = 1
    return LinearBinary(weight.reshape(1, 2, 2), bias=-0.1)


@pytest.fixture
def tiny_info():
    return DatasetInfo("tiny", (1, 2, 2), ("a", "b"), (0.5,), (0.25,))
