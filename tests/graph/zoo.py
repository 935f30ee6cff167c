"""User-style models that are not in qrobust's registry: the way people write networks in tutorials.

Each entry of ``ZOO`` gives the model, its input shape (C, H, W), its Conv2d/Linear layers in call
order, and the techniques that can run it (``qrobust.graph.TECHNIQUES``); the tests check every claim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ALL = frozenset({"int8", "export", "bounds", "mixed", "admm", "prune"})
ANY_GRAPH = frozenset({"mixed", "admm", "prune"})  # these only rewrite Conv2d/Linear weights


class TutorialCNN(nn.Module):
    """The PyTorch tutorial's LeNet: functional relu and max_pool2d, ``x.view(x.size(0), -1)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 2 * 2, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (N, 4, 4, 4)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (N, 8, 2, 2)
        x = x.view(x.size(0), -1)  # (N, 32)
        return self.fc2(F.relu(self.fc1(x)))


class InlineNormMLP(nn.Module):
    """Normalises inline with buffers, ``(x - mean) / std``, then flattens with torch.flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1))
        self.fc1 = nn.Linear(3 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


class Block(nn.Module):
    """torchvision's BasicBlock: one ReLU module called twice, ``out += identity``, a downsample."""

    def __init__(self, planes_in: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(planes_in, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or planes_in != planes:
            self.downsample = nn.Sequential(nn.Conv2d(planes_in, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet18Style(nn.Module):
    """A small ResNet-18 layout: stem, two stages of blocks, AdaptiveAvgPool2d((1, 1)), flatten, fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(Block(8, 8, 1))
        self.layer2 = nn.Sequential(Block(8, 16, 2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class VGGStyle(nn.Module):
    """``features`` and ``classifier`` Sequentials, with Dropout in the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=True),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Linear(16 * 2 * 2, 32), nn.ReLU(True), nn.Dropout(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(x.view(x.size(0), -1))


class MobileNetStyle(nn.Module):
    """An inverted-residual-like block: expand, depthwise 3x3 (groups = channels), project, ReLU6."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.project = nn.Conv2d(8, 16, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.bn0(self.stem(x)))  # (N, 8, 4, 4)
        x = nn.functional.relu6(self.bn1(self.depthwise(x)))
        x = self.bn2(self.project(x))  # (N, 16, 4, 4)
        return self.fc(self.pool(x).flatten(1))


class HeadFirst(nn.Module):
    """Registers its classifier before its body: registration order is not call order."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8 * 4 * 4, 10)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.body(x), 1))


class ReadTwice(nn.Module):
    """A BasicBlock-like conv1/bn1/relu1/conv2 whose relu1 output is also the residual."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu1(self.bn1(self.conv1(x)))
        out = F.relu(self.conv2(h) + h)  # h is read twice
        return self.fc(out.reshape(out.shape[0], -1))


class CatNet(nn.Module):
    """Two branches joined by torch.cat along channels (an Inception-like block), then AvgPool2d."""

    def __init__(self) -> None:
        super().__init__()
        self.branch1 = nn.Conv2d(3, 4, 1)
        self.branch3 = nn.Conv2d(3, 4, 3, padding=1)
        self.mix = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([F.relu(self.branch1(x)), F.relu(self.branch3(x))], dim=1)  # (N, 8, 8, 8)
        x = self.pool(F.relu(self.mix(x)))  # (N, 8, 4, 4)
        return self.fc(torch.flatten(x, 1))


class AvgPoolNet(nn.Module):
    """nn.AvgPool2d between convs (not global pooling)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(6 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(F.relu(self.conv(x))), 1))


class DropoutMLP(nn.Module):
    """nn.Dropout and nn.Identity between Linear layers (no-ops in eval mode), nn.Flatten first."""

    def __init__(self) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(1 * 8 * 8, 32)
        self.drop = nn.Dropout(0.5)
        self.skip = nn.Identity()
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.skip(self.drop(F.relu(self.fc1(self.flatten(x))))))


class NoBias(nn.Module):
    """Conv and Linear without bias, BatchNorm after the conv, ``reshape`` to flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 10, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        return self.fc(x.reshape(x.size(0), -1))


class LeakyNet(nn.Module):
    """LeakyReLU: no exact integer kernel and no ReLU relaxation, so int8 and bounds refuse it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.LeakyReLU(0.1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.act(self.conv(x)), 1))


class SigmoidGate(nn.Module):
    """A gate computed with torch.sigmoid and multiplied in."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3 * 8 * 8, 16)
        self.gate = nn.Linear(3 * 8 * 8, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        return self.fc2(F.relu(self.fc1(x)) * torch.sigmoid(self.gate(x)))


@dataclass(frozen=True)
class Entry:
    build: Callable[[], nn.Module]
    shape: tuple[int, int, int]
    affine: tuple[str, ...]  # Conv2d/Linear names in call order
    techniques: frozenset[str]


ZOO: dict[str, Entry] = {
    "tutorial_cnn": Entry(TutorialCNN, (1, 10, 10), ("conv1", "conv2", "fc1", "fc2"), ALL),
    "inline_norm_mlp": Entry(InlineNormMLP, (3, 4, 4), ("fc1", "fc2"), ALL),
    "resnet18_style": Entry(
        ResNet18Style,
        (3, 8, 8),
        (
            "conv1",
            "layer1.0.conv1",
            "layer1.0.conv2",
            "layer2.0.downsample.0",
            "layer2.0.conv1",
            "layer2.0.conv2",
            "fc",
        ),
        ALL - {"bounds"},
    ),
    "vgg_style": Entry(
        VGGStyle, (3, 8, 8), ("features.0", "features.3", "features.7", "classifier.0", "classifier.3"), ALL
    ),
    "mobilenet_style": Entry(MobileNetStyle, (3, 8, 8), ("stem", "depthwise", "project", "fc"), ANY_GRAPH),
    "head_first": Entry(HeadFirst, (3, 8, 8), ("body.0", "head"), ALL),
    "read_twice": Entry(ReadTwice, (3, 8, 8), ("conv1", "conv2", "fc"), ALL - {"bounds"}),
    "cat_net": Entry(CatNet, (3, 8, 8), ("branch1", "branch3", "mix", "fc"), ANY_GRAPH),
    "avgpool_net": Entry(AvgPoolNet, (3, 8, 8), ("conv", "fc"), ANY_GRAPH),
    "dropout_mlp": Entry(DropoutMLP, (1, 8, 8), ("fc1", "fc2"), ALL),
    "no_bias": Entry(NoBias, (3, 8, 8), ("conv", "fc"), ALL),
    "leaky_net": Entry(LeakyNet, (3, 8, 8), ("conv", "fc"), ANY_GRAPH),
    "sigmoid_gate": Entry(SigmoidGate, (3, 8, 8), ("fc1", "gate", "fc2"), ANY_GRAPH),
}


def build(name: str, seed: int = 0) -> nn.Module:
    """The zoo model ``name`` with seeded weights and random BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = ZOO[name].build()
    generator = torch.Generator().manual_seed(seed + 1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            channels = module.num_features
            module.weight.data = 0.5 + torch.rand(channels, generator=generator)
            module.bias.data = 0.2 * torch.randn(channels, generator=generator)
            module.running_mean = 0.2 * torch.randn(channels, generator=generator)
            module.running_var = 0.5 + torch.rand(channels, generator=generator)
    return model.eval()
