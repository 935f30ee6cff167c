"""Tests for qrobust.models.mobilenet: shapes, depthwise layers, residuals, options and a quick fit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qrobust.data import load_dataset
from qrobust.data.base import DatasetInfo
from qrobust.models import InvertedResidual, MobileNetV2, build_model
from qrobust.quant import layer_infos

GRAY28 = DatasetInfo("gray28", (1, 28, 28), tuple("abcdefghij"), (0.29,), (0.35,))
CIFAR = DatasetInfo("cifar", (3, 32, 32), tuple("abcdefghij"), (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))


@pytest.mark.parametrize(("info", "sides"), [(GRAY28, [28, 14, 7, 4]), (CIFAR, [32, 16, 8, 4])])
def test_shapes_and_depthwise_layers(info: DatasetInfo, sides: list[int]) -> None:
    torch.manual_seed(0)
    model = build_model("mobilenetv2", info).eval()
    with torch.no_grad():
        assert model(torch.rand(3, *info.shape)).shape == (3, 10)
    layers = layer_infos(model, info.shape)
    # stem, (dw, project), 6 x (expand, dw, project), head 1x1, fc
    assert len(layers) == 1 + 2 + 6 * 3 + 1 + 1
    depthwise = [layer for layer in layers if layer.depthwise]
    assert [layer.name for layer in depthwise] == ["blocks.0.block.0"] + [f"blocks.{i}.block.3" for i in range(1, 7)]
    for layer in depthwise:
        module = model.get_submodule(layer.name)
        assert module.groups == layer.in_channels == layer.out_channels and layer.kernel_size == 3
        assert layer.params == 9 * layer.out_channels  # one 3x3 filter per channel, no bias
    assert all(getattr(model.get_submodule(layer.name), "groups", 1) == 1 for layer in layers if not layer.depthwise)
    # the stride-2 depthwise convs of blocks 1, 3, 5 halve the side (rounding up)
    assert sorted({layer.out_size for layer in layers if layer.kind == "conv"}, reverse=True) == sides
    assert [layer.name for layer in layers if layer.stride == 2] == [f"blocks.{i}.block.3" for i in (1, 3, 5)]
    assert layers[-1].kind == "linear" and layers[-1].in_channels == 256


def test_linear_bottlenecks_and_residuals() -> None:
    model = build_model("mobilenetv2", GRAY28)
    blocks = [block for block in model.modules() if isinstance(block, InvertedResidual)]
    assert [block.residual for block in blocks] == [True, False, True, False, True, False, True]
    for block in blocks:
        assert isinstance(block.block[-1], nn.BatchNorm2d)  # the projection ends without an activation
    assert sum(isinstance(m, nn.ReLU6) for m in model.modules()) == 1 + 1 + 6 * 2 + 1


def test_width_mult_scales_channels() -> None:
    half = build_model("mobilenetv2", GRAY28, width_mult=0.5)
    channels = [layer.out_channels for layer in layer_infos(half, GRAY28.shape)]
    assert channels[:3] == [8, 8, 8] and channels[-2] == 128  # 16, 16, 16 and 256 halved (multiples of 8)
    assert sum(p.numel() for p in half.parameters()) < sum(p.numel() for p in MobileNetV2(GRAY28).parameters()) / 2.5
    for bad in (0, -1.0, float("nan"), True, "1"):
        with pytest.raises(ValueError, match="width_mult must be a finite number > 0"):
            build_model("mobilenetv2", GRAY28, width_mult=bad)


def test_fits_a_small_batch_of_digits() -> None:
    """Trainable: a few Adam steps fit 64 real 8x8 digits (any size works, 8 -> 4 -> 2 -> 1)."""
    torch.manual_seed(0)
    data = load_dataset("digits", "train").subset(64, 0)
    model = build_model("mobilenetv2", data.info, width_mult=0.5).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    images = data.images.float() / 255
    for _ in range(20):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images), data.labels)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = float((model.eval()(images).argmax(1) == data.labels).float().mean())
    assert loss.item() < 0.5 and accuracy > 0.8
