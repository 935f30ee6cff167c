"""A small MobileNetV2 for 28x28 and 32x32 images (any size works: every stride-2 stage halves, rounding up)."""

from __future__ import annotations

import math

import torch
from torch import nn

from qrobust.data.base import DatasetInfo
from qrobust.models.layers import Normalize, kaiming_init_convs

# (expansion t, output channels c, blocks n, stride s of the first block), as in Sandler et al.'s Table 2,
# cut to three stride-2 stages for 28x28 / 32x32 inputs: 28 -> 14 -> 7 -> 4, 32 -> 16 -> 8 -> 4.
STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2), (6, 64, 2, 2))
STEM_CHANNELS, HEAD_CHANNELS = 16, 256


class InvertedResidual(nn.Module):
    """1x1 expansion conv (skipped when ``expansion`` is 1), 3x3 depthwise conv, 1x1 linear bottleneck.

    Each conv is followed by BatchNorm; the first two by ReLU6, the projection by nothing (the linear
    bottleneck). A residual connection joins input and output when the stride is 1 and the channels match.

    Shapes: input (N, in_channels, H, W) -> output (N, out_channels, ceil(H/stride), ceil(W/stride)).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [*_conv_bn(in_channels, hidden, kernel_size=1), nn.ReLU6()]
        layers += [*_conv_bn(hidden, hidden, kernel_size=3, stride=stride, groups=hidden), nn.ReLU6()]
        layers += _conv_bn(hidden, out_channels, kernel_size=1)
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


def _conv_bn(
    in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1
) -> list[nn.Module]:
    """A bias-free conv ("same" padding) and the BatchNorm after it."""
    conv = nn.Conv2d(
        in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, groups=groups, bias=False
    )
    return [conv, nn.BatchNorm2d(out_channels)]


def _channels(channels: int, width_mult: float) -> int:
    """``channels * width_mult`` rounded to a multiple of 8 (at least 8), as in the reference MobileNetV2."""
    return max(8, int(channels * width_mult + 4) // 8 * 8)


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018), small.

    A 3x3 stem conv (stride 1: the images are small), seven inverted residual blocks in four stages
    (``STAGES``: 16, 24, 32, 64 channels, the last three halving the resolution), a 1x1 conv to 256
    channels, global average pooling and a linear classifier; BatchNorm after every conv, ReLU6. It has
    23 weighted layers (7 depthwise), one of ARQ's benchmark architectures at a size that trains on
    Fashion-MNIST on a CPU in minutes (about 7 MMACs per 28x28 image at ``width_mult=1``).

    Args:
        info: the dataset the model reads (input shape, statistics, number of classes).
        width_mult: scales every channel count (rounded to multiples of 8), > 0 (default 1.0).

    Shapes: input (N, C, H, W) in [0, 1] -> logits (N, num_classes).
    """

    def __init__(self, info: DatasetInfo, width_mult: float = 1.0) -> None:
        super().__init__()
        if (
            isinstance(width_mult, bool)
            or not isinstance(width_mult, (int, float))
            or not (math.isfinite(width_mult) and width_mult > 0)
        ):
            raise ValueError(f"width_mult must be a finite number > 0, got {width_mult!r}")
        self.width_mult = float(width_mult)
        channels = _channels(STEM_CHANNELS, width_mult)
        self.normalize = Normalize.from_info(info)
        self.stem = nn.Sequential(*_conv_bn(info.shape[0], channels, kernel_size=3), nn.ReLU6())
        blocks = []
        for expansion, out, repeats, stride in STAGES:
            out = _channels(out, width_mult)
            for i in range(repeats):
                blocks.append(InvertedResidual(channels, out, stride if i == 0 else 1, expansion))
                channels = out
        self.blocks = nn.Sequential(*blocks)
        head = _channels(HEAD_CHANNELS, width_mult)
        self.head = nn.Sequential(*_conv_bn(channels, head, kernel_size=1), nn.ReLU6())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(head, info.num_classes)
        kaiming_init_convs(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.normalize(x))  # (N, 16w, H, W)
        x = self.blocks(x)  # (N, 64w, H/8, W/8), rounded up
        x = self.head(x)  # (N, 256w, H/8, W/8)
        x = self.flatten(self.pool(x))  # (N, 256w)
        return self.fc(x)  # (N, num_classes)

    def extra_repr(self) -> str:
        return f"width_mult={self.width_mult}"
