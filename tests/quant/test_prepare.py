"""Tests for qrobust.quant.prepare: structure-driven fusion and clear refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qrobust.models import Normalize, build_model, model_names
from qrobust.quant import QATModel, QuantConfig, prepare_qat
from qrobust.quant.qat import QAdd, QConv2d, QGlobalAvgPool, QLinear

from .conftest import QUANTIZABLE, SHAPES, make_info


@pytest.mark.parametrize("name", QUANTIZABLE)
def test_prepare_fuses_every_registered_model(name: str) -> None:
    model = build_model(name, make_info(SHAPES[name]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qat = prepare_qat(model, QuantConfig(ema_decay=0.9))
    assert isinstance(qat, QATModel) and qat.training == model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched
    kinds = [type(step) for step in qat.steps]
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(step.bn is not None for step in qat.steps if isinstance(step, QConv2d)) == bns
    assert isinstance(qat.steps[-1], QLinear) and qat.steps[-1].out_quant is None
    if name.startswith("resnet"):
        depth = int(name[len("resnet") :])
        assert kinds.count(QAdd) == (depth - 2) // 2 and kinds.count(QGlobalAvgPool) == 1
        assert all(step.relu for step in qat.steps if isinstance(step, QAdd))


@pytest.mark.parametrize("name", [name for name in model_names() if name not in QUANTIZABLE])
def test_prepare_refuses_the_other_registered_models(name: str) -> None:
    """A registered model missing from the quantizable list must be one the engine cannot run."""
    with pytest.raises(ValueError, match="cannot quantize"):
        prepare_qat(build_model(name, make_info((3, 8, 8))))


class Branchy(nn.Module):
    """Uses functional relu/add/flatten and Identity: the dataflow, not the class, decides."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = Normalize([0.5], [0.25])
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.b = nn.Conv2d(1, 4, 1)
        self.skip = nn.Identity()
        self.head = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        y = torch.relu(self.a(x) + self.skip(self.b(x)))
        return self.head(torch.flatten(y, 1))


def test_prepare_follows_the_dataflow_of_functional_code() -> None:
    qat = prepare_qat(Branchy().eval())
    assert [type(s).__name__ for s in qat.steps] == ["QConv2d", "QConv2d", "QAdd", "QFlatten", "QLinear"]
    assert qat.inputs[2] == (1, 2) and qat.steps[2].relu
    assert qat.steps[0].input_mean is not None and qat.steps[1].input_mean is not None


class Unsupported(nn.Module):
    def __init__(self, tail: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.tail = tail
        self.head = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.tail(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize(
    "model, message",
    [
        (Unsupported(nn.Sigmoid()), "is not supported"),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()), "must end in a Linear layer"),
        (nn.Sequential(nn.Conv2d(1, 2, 3, groups=1, dilation=2), nn.Flatten(), nn.Linear(8, 2)), "dilation"),
        (nn.Sequential(nn.Flatten(), nn.ReLU(), nn.Linear(4, 2)), "cannot be fused"),
        (
            nn.Sequential(Normalize([0.5], [0.2]), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4, 2)),
            "only Conv2d/Linear may read Normalize",
        ),
        (
            nn.Sequential(nn.MaxPool2d(2), Normalize([0.5], [0.2]), nn.Conv2d(1, 2, 1), nn.Flatten(), nn.Linear(8, 2)),
            "Normalize must read the model input",
        ),
    ],
)
def test_prepare_refuses_what_the_engine_cannot_run(model: nn.Module, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        prepare_qat(model)


def test_prepare_gives_the_input_quantizer_the_configured_margin() -> None:
    qat = prepare_qat(build_model("cnn", make_info((1, 8, 8))), QuantConfig(input_margin=255))
    assert (qat.input_quant.margin, qat.input_quant.step, qat.input_quant.zero_point) == (255, 3, 85)
    assert qat.steps[0].input_quant is qat.input_quant  # the first conv's bias grid follows the input's
    assert prepare_qat(build_model("cnn", make_info((1, 8, 8)))).input_quant.step == 1


def test_prepare_checks_its_config() -> None:
    with pytest.raises(ValueError, match="config must be a QuantConfig"):
        prepare_qat(build_model("mlp", make_info((1, 4, 4))), {"ema_decay": 0.9})
