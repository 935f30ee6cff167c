"""A fully connected ReLU network on flattened images."""

from __future__ import annotations

import torch
from torch import nn

from qrobust.data.base import DatasetInfo
from qrobust.models.layers import Normalize


class MLP(nn.Module):
    """``depth`` linear layers with ReLU between them, on the flattened normalised image.

    The plain fully connected nets (2 to 10 layers) used to study certified robustness to weight
    perturbations (Weng et al., "Towards Certificated Model Robustness Against Weight
    Perturbations", 2020).

    Args:
        info: the dataset the model reads (input shape, statistics, number of classes).
        depth: number of linear layers, >= 2 (default 3).
        width: units in every hidden layer, >= 1 (default 256).

    Shapes: input (N, C, H, W) in [0, 1] -> logits (N, num_classes).
    """

    def __init__(self, info: DatasetInfo, depth: int = 3, width: int = 256) -> None:
        super().__init__()
        _check_int("depth", depth, minimum=2)
        _check_int("width", width, minimum=1)
        channels, height, width_px = info.shape
        in_features = channels * height * width_px
        self.normalize = Normalize.from_info(info)
        self.flatten = nn.Flatten()
        layers: list[nn.Module] = []
        for i in range(depth - 1):
            layers += [nn.Linear(in_features if i == 0 else width, width), nn.ReLU()]
        self.hidden = nn.Sequential(*layers)
        self.head = nn.Linear(width, info.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(self.normalize(x))  # (N, C*H*W)
        x = self.hidden(x)  # (N, width)
        return self.head(x)  # (N, num_classes)


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
