"""CIFAR ResNets of depth 6n+2 (ResNet-20 ... ResNet-110)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from qrobust.data.base import DatasetInfo
from qrobust.models.layers import Normalize, kaiming_init_convs


class BasicBlock(nn.Module):
    """Two conv3x3-BN layers with a residual connection, ReLU after the sum.

    Where the shape changes the shortcut is a 1x1 conv + BN projection (He et al.'s option B),
    so every conv is followed by a BN that can be folded and no parameter-free padding is needed.

    Shapes: input (N, in_planes, H, W) -> output (N, planes, H/stride, W/stride).
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))  # (N, planes, H/stride, W/stride)
        out = self.bn2(self.conv2(out))
        return self.relu2(self.perturb(out + self.shortcut(x)))

    def perturb(self, out: torch.Tensor) -> torch.Tensor:
        """The residual sum before the last ReLU, unchanged; subclasses inject noise here."""
        return out


# (in_planes, planes, stride) -> a residual block, e.g. ``BasicBlock`` itself.
BlockFactory = Callable[[int, int, int], nn.Module]


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al., "Deep Residual Learning for Image Recognition" (2016).

    A 3x3 stem conv to 16 channels, three stages of n BasicBlocks with 16, 32 and 64 channels
    (the last two halve the resolution), global average pooling and a linear classifier:
    6n+2 weighted layers. The stem reads ``info.shape[0]`` channels, so 1x28x28 inputs work too.

    Args:
        info: the dataset the model reads (input shape, statistics, number of classes).
        depth: 6n+2 for some n >= 1, e.g. 8, 20, 32, 44, 56, 110.
        block: builds each residual block from (in_planes, planes, stride); default ``BasicBlock``.

    Shapes: input (N, C, H, W) in [0, 1] -> logits (N, num_classes).
    """

    def __init__(self, info: DatasetInfo, depth: int, block: BlockFactory = BasicBlock) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, ...), got {depth!r}")
        blocks = (depth - 2) // 6
        self.normalize = Normalize.from_info(info)
        self.conv1 = nn.Conv2d(info.shape[0], 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu1 = nn.ReLU()
        self.layer1 = _stage(block, 16, 16, blocks, stride=1)
        self.layer2 = _stage(block, 16, 32, blocks, stride=2)
        self.layer3 = _stage(block, 32, 64, blocks, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, info.num_classes)
        kaiming_init_convs(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        x = self.relu1(self.bn1(self.conv1(x)))  # (N, 16, H, W)
        x = self.layer1(x)  # (N, 16, H, W)
        x = self.layer2(x)  # (N, 32, H/2, W/2)
        x = self.layer3(x)  # (N, 64, H/4, W/4)
        x = self.flatten(self.pool(x))  # (N, 64)
        return self.fc(x)  # (N, num_classes)


def _stage(block: BlockFactory, in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """``blocks`` residual blocks; only the first one changes channels and stride."""
    layers = [block(in_planes, planes, stride)]
    layers += [block(planes, planes, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)
