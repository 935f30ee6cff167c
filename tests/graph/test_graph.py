"""qrobust.graph: the folds are exact, shape arithmetic is no layer, and errors are one clear line."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qrobust.errors import QRobustError, UnsupportedModelError
from qrobust.graph import check_supported, fold_batchnorm, fold_normalize, trace
from qrobust.models.layers import Normalize


def test_fold_normalize_into_a_conv_pads_with_the_means() -> None:
    torch.manual_seed(0)
    normalize, conv = Normalize([0.3, 0.5], [0.2, 0.4]), nn.Conv2d(2, 3, 3, padding=1)
    x = torch.rand(4, 2, 5, 5, dtype=torch.float64)
    weight, bias = fold_normalize(conv.weight.double(), conv.bias.double(), normalize.mean, normalize.std)
    pad = normalize.mean.double()  # zero padding of the normalised image is mean padding of the raw one
    padded = torch.cat([pad.view(1, 2, 1, 1).expand(4, 2, 5, 1), x, pad.view(1, 2, 1, 1).expand(4, 2, 5, 1)], 3)
    row = pad.view(1, 2, 1, 1).expand(4, 2, 1, 7)
    folded = F.conv2d(torch.cat([row, padded, row], 2), weight, bias)
    expected = F.conv2d(normalize.double()(x), conv.weight.double(), conv.bias.double(), padding=1)
    torch.testing.assert_close(folded, expected)


def test_fold_normalize_into_a_linear_repeats_each_statistic_over_the_pixels() -> None:
    torch.manual_seed(0)
    normalize, linear = Normalize([0.3, 0.5], [0.2, 0.4]), nn.Linear(2 * 3 * 3, 4).double()
    x = torch.rand(5, 2, 3, 3, dtype=torch.float64)
    weight, bias = fold_normalize(linear.weight, linear.bias, normalize.mean, normalize.std)
    torch.testing.assert_close(F.linear(x.flatten(1), weight, bias), linear(normalize.double()(x).flatten(1)))
    with pytest.raises(QRobustError, match="not a multiple of 2 channels"):
        fold_normalize(torch.ones(4, 7), torch.zeros(4), normalize.mean, normalize.std)


def test_fold_batchnorm_equals_conv_then_batchnorm_in_eval_mode() -> None:
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
    bn.running_mean, bn.running_var = torch.randn(4), torch.rand(4) + 0.5
    bn.weight.data, bn.bias.data = torch.rand(4) + 0.5, torch.randn(4)
    x = torch.rand(2, 3, 6, 6)
    weight, bias = fold_batchnorm(conv.weight.detach(), conv.bias.detach(), bn.eval())
    torch.testing.assert_close(F.conv2d(x, weight, bias), bn(conv(x)), rtol=1e-5, atol=1e-5)
    with pytest.raises(QRobustError, match="running statistics"):
        fold_batchnorm(weight, bias, nn.BatchNorm2d(4, track_running_stats=False))


class ScalarNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - 0.5) / 0.25
        return self.fc(x.reshape(x.shape[0], -1))


def test_inline_scalar_normalisation_and_shape_arithmetic() -> None:
    graph = trace(ScalarNorm(), torch.rand(3, 1, 2, 2))
    assert [(layer.kind, layer.inputs) for layer in graph.layers] == [
        ("normalize", ("x",)),
        ("flatten", ("truediv",)),
        ("linear", ("reshape",)),
    ]
    assert graph.layers[0].module.mean.tolist() == [0.5] and graph.layers[1].output_shape == (3, 4)


class Branching(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: not traceable
            return self.fc(x)
        return -self.fc(x)


class TwoInputs(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + y


def test_errors_are_one_line_and_name_the_model() -> None:
    with pytest.raises(QRobustError, match=r"cannot trace Branching with torch\.fx") as caught:
        trace(Branching())
    with pytest.raises(QRobustError, match="TwoInputs must take one input tensor, its forward takes 2"):
        trace(TwoInputs())
    with pytest.raises(QRobustError, match="technique must be one of int8, export, bounds"):
        check_supported(ScalarNorm(), None, "int4")
    with pytest.raises(QRobustError, match=r"ScalarNorm fails on an input of shape \(1, 3\)"):
        trace(ScalarNorm(), torch.rand(1, 3))
    with pytest.raises(UnsupportedModelError, match=r"dilation") as unsupported:
        check_supported(nn.Sequential(nn.Conv2d(1, 1, 3, dilation=2), nn.Flatten(), nn.Linear(1, 1)), None, "int8")
    assert isinstance(unsupported.value, ValueError) and "\n" not in str(unsupported.value)
    assert "\n" not in str(caught.value)


class ConstantShift(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x - torch.tensor([0.1, 0.2, 0.3]))  # a (3,) constant: per feature, not per channel


def test_tracing_leaves_the_model_as_it_was_and_keeps_unknown_ops() -> None:
    model = ConstantShift()
    before = set(vars(model))
    graph = trace(model, torch.rand(2, 3))
    assert set(vars(model)) == before  # fx's tensor constants are removed again
    assert [(layer.kind, layer.target) for layer in graph.layers] == [("other", "sub"), ("linear", "fc")]
