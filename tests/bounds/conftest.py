"""Shared fixtures for qrobust.bounds: tiny seeded networks trained in a second on digits, no downloads."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from qrobust.data import load_dataset
from qrobust.models import Normalize, build_model


class TinyCNN(nn.Module):
    """The registry cnn's structure (padded convs, max pooling, two Linear layers) at a tenth of its width."""

    def __init__(self, info):
        super().__init__()
        self.normalize = Normalize.from_info(info)
        self.conv1, self.relu1, self.pool1 = nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        self.conv2, self.relu2, self.pool2 = nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        self.flatten, self.fc1, self.relu3, self.fc2 = nn.Flatten(), nn.Linear(24, 12), nn.ReLU(), nn.Linear(12, 10)

    def forward(self, x):
        x = self.pool1(self.relu1(self.conv1(self.normalize(x))))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc2(self.relu3(self.fc1(self.flatten(x))))


class ConvLinear(nn.Module):
    """A padded conv read by Linear layers through Flatten: the conv layer gets linear bounds too."""

    def __init__(self, info):
        super().__init__()
        self.normalize = Normalize.from_info(info)
        self.conv, self.relu1, self.flatten = nn.Conv2d(1, 3, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten()
        self.fc1, self.relu2, self.fc2 = nn.Linear(48, 12), nn.ReLU(), nn.Linear(12, 10)

    def forward(self, x):
        return self.fc2(self.relu2(self.fc1(self.flatten(self.relu1(self.conv(self.normalize(x)))))))


@functools.cache
def digits():
    """The digits training split (8x8 uint8 images)."""
    return load_dataset("digits", "train")


@functools.cache
def trained(name: str, **options) -> nn.Module:
    """Registry model ``name`` trained full-batch with Adam on digits for a few hundred steps (seeded)."""
    data = digits()
    torch.manual_seed(0)
    builders = {"tiny_cnn": TinyCNN, "conv_linear": ConvLinear}
    model = builders[name](data.info) if name in builders else build_model(name, data.info, **options)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    x = data.images.float() / 255
    for _ in range(150):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), data.labels).backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="session")
def digit_images():
    """(images uint8 (N, 1, 8, 8), labels (N,)) of 64 digits spread over the training split."""
    data = digits()
    index = torch.arange(0, len(data), len(data) // 64)[:64]
    return data.images[index], data.labels[index]
