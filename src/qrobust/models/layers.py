"""Layers shared by all models: input normalisation and He initialisation."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from qrobust.data.base import DatasetInfo


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std``, the first layer of every model.

    Keeping normalisation inside the model means noise, perturbations and certified radii all
    live in the [0, 1] input space (as in Cohen et al., "Certified Adversarial Robustness via
    Randomized Smoothing", 2019). ``mean`` and ``std`` are buffers, so they are saved in the
    state_dict and follow ``.to()``.

    Args:
        mean: per-channel means, length C.
        std: per-channel standard deviations, length C, all > 0.

    Shapes: input (N, C, H, W) -> output (N, C, H, W).
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.tensor(mean, dtype=torch.get_default_dtype())
        std_t = torch.tensor(std, dtype=torch.get_default_dtype())
        if mean_t.dim() != 1 or mean_t.numel() == 0 or mean_t.shape != std_t.shape:
            raise ValueError(
                f"mean and std must be non-empty sequences of equal length, got mean={list(mean)} and std={list(std)}"
            )
        if not all(math.isfinite(s) and s > 0 for s in map(float, std)):  # floats: also checks in a meta-device build
            raise ValueError(f"std must be finite and > 0 in every channel, got {list(std)}")
        self.register_buffer("mean", mean_t)  # (C,)
        self.register_buffer("std", std_t)  # (C,)

    @classmethod
    def from_info(cls, info: DatasetInfo) -> Normalize:
        """Normalisation by ``info``'s statistics, after checking they have one entry per channel."""
        channels = info.shape[0]
        if len(info.mean) != channels or len(info.std) != channels:
            raise ValueError(
                f"{info.name} has {channels} channels but mean has {len(info.mean)} and std has {len(info.std)} entries"
            )
        return cls(info.mean, info.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean[:, None, None]) / self.std[:, None, None]

    def extra_repr(self) -> str:
        return f"mean={self.mean.tolist()}, std={self.std.tolist()}"


def kaiming_init_convs(model: nn.Module) -> None:
    """He-normal init (fan-in, ReLU gain) for every conv in ``model``, as in the reference CIFAR
    ResNet code (He et al., "Delving Deep into Rectifiers", 2015)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
