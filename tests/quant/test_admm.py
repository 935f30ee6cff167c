"""ADMM low-bit quantization (Weng et al. 2020) and the LB baseline (Leng et al. 2018) on a digits MLP."""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qrobust.bounds import ReluNetwork, certified_eps
from qrobust.data import LatticeDataset, load_dataset
from qrobust.data.base import DatasetInfo
from qrobust.errors import CheckpointError
from qrobust.models import build_model
from qrobust.quant import ADMMConfig, admm_quantize, load_codes, save_codes
from qrobust.quant.admm import certificate_epsilons, grid_top, quantizable_layers
from qrobust.train import TrainConfig, accuracy, train

FAST = {"iterations": 10, "steps": 50, "batch_size": 64}


@functools.cache
def _digits():
    train_set, test_set = load_dataset("digits", "train"), load_dataset("digits", "test")
    torch.manual_seed(0)
    model = build_model("mlp", train_set.info, depth=3, width=64)
    train(model, train_set, TrainConfig(epochs=15, batch_size=32, lr=0.05, seed=0), progress=False)
    return model.eval(), train_set, test_set


@pytest.fixture(scope="module")
def digits():
    """A three-layer MLP trained on digits (about 98% test accuracy), and the two splits; ~2 s."""
    return _digits()


@functools.cache
def _quantized(method: str, bits: int):
    model, train_set, test_set = _digits()
    return admm_quantize(model, train_set, ADMMConfig(bits=bits, method=method, **FAST), test_set=test_set)


def naive_rounding(model, bits: int):
    """Every weight rounded to the grid whose top code sits at max |W| (no clipping, no training)."""
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for _, module in quantizable_layers(rounded):
            scale = module.weight.abs().max() / grid_top(bits)
            module.weight.copy_(torch.round(module.weight / scale) * scale)
    return rounded


@pytest.mark.parametrize("bits", [3, 8])
@pytest.mark.parametrize("method", ["admm", "lb"])
def test_weights_are_exactly_on_the_grid(digits, method, bits):
    model, _, _ = digits
    before = copy.deepcopy(model.state_dict())
    result = _quantized(method, bits)
    quantized = dict(quantizable_layers(result.model))
    assert [layer.name for layer in result.layers] == list(quantized) == ["hidden.0", "hidden.2", "head"]
    for layer in result.layers:
        assert layer.codes.dtype == torch.int8 and layer.bits == bits and layer.scale > 0
        assert int(layer.codes.abs().max()) <= grid_top(bits)
        assert torch.equal(quantized[layer.name].weight, layer.codes.float() * layer.scale)
        assert torch.equal(result.export()[layer.name].dequantize(), quantized[layer.name].weight)
        assert len(torch.unique(quantized[layer.name].weight)) <= 2 * grid_top(bits) + 1
    for key, value in model.state_dict().items():  # the input model is untouched
        assert torch.equal(value, before[key])
    quantized_state = result.model.state_dict()
    for key in ("hidden.0.bias", "hidden.2.bias", "head.bias", "normalize.mean"):
        assert torch.equal(quantized_state[key], before[key])


def test_history_records_every_iteration(digits):
    result = _quantized("admm", 3)
    assert [stats.iteration for stats in result.history] == list(range(FAST["iterations"] + 1))
    assert result.history[0].loss is None and all(stats.loss is not None for stats in result.history[1:])
    assert all(0 <= stats.train_accuracy <= 1 and 0 <= stats.test_accuracy <= 1 for stats in result.history)
    rhos = [stats.rho for stats in result.history[1:]]
    assert rhos == pytest.approx([0.01 * 1.2**i for i in range(len(rhos))])
    _, _, test_set = digits
    assert result.history[-1].test_accuracy == pytest.approx(accuracy(result.model, test_set))
    summary = result.summary()
    assert summary["config"]["bits"] == 3 and len(summary["history"]) == len(result.history)


def test_admm_beats_naive_rounding_at_low_bits(digits):
    """3 bits (codes -2..2) on digits: float 98.2%, naive rounding 79.1%, ADMM 97.3% (measured)."""
    model, _, test_set = digits
    float_accuracy = accuracy(model, test_set)
    naive = accuracy(naive_rounding(model, 3), test_set)
    admm = accuracy(_quantized("admm", 3).model, test_set)
    assert naive < float_accuracy - 0.1  # the test is only meaningful if rounding hurts
    assert admm >= naive + 0.1
    assert admm >= float_accuracy - 0.03
    assert accuracy(_quantized("lb", 3).model, test_set) >= float_accuracy - 0.03


def test_lb_is_a_different_algorithm_from_the_same_start(digits):
    admm, lb = _quantized("admm", 3), _quantized("lb", 3)
    assert admm.history[0].train_accuracy == lb.history[0].train_accuracy  # same initial projection
    assert any(not torch.equal(a.codes, b.codes) or a.scale != b.scale for a, b in zip(admm.layers, lb.layers))


def test_runs_are_deterministic(digits):
    model, train_set, _ = digits
    config = ADMMConfig(bits=4, iterations=2, steps=10, seed=3)
    first, second = (admm_quantize(model, train_set, config) for _ in range(2))
    assert all(torch.equal(a.codes, b.codes) and a.scale == b.scale for a, b in zip(first.layers, second.layers))


def test_certificate_box_holds_at_the_end(digits):
    """Radii of one grid step (at the max-abs scale): every weight's box holds a code, so every final
    weight must lie within eps of the float weight; ADMM still trains (the box is not a point)."""
    model, train_set, test_set = digits
    centers = {name: module.weight.detach().clone() for name, module in quantizable_layers(model)}
    epsilons = {name: float(c.abs().max()) / grid_top(4) for name, c in centers.items()}
    result = admm_quantize(model, train_set, ADMMConfig(bits=4, box_codes=True, **FAST), epsilons=epsilons)
    for layer, center, eps in zip(result.layers, centers.values(), epsilons.values(), strict=True):
        deviation = (layer.dequantize() - center).abs()
        assert layer.epsilon == eps and layer.box_feasible == 1.0
        assert float(deviation.max()) <= eps * (1 + 1e-5)
        assert layer.box_violation == pytest.approx(float((deviation - eps).clamp(min=0).max()), abs=1e-7)
    assert accuracy(result.model, test_set) >= accuracy(model, test_set) - 0.05


def test_tight_certificate_keeps_codes_nearest_to_the_box(digits):
    """A radius far below half a grid step leaves most boxes without a code: each code is then the one
    nearest to its box, so the weights stay within half a step (plus eps) of the float ones."""
    model, train_set, _ = digits
    centers = [module.weight.detach().clone() for _, module in quantizable_layers(model)]
    config = ADMMConfig(bits=4, iterations=3, steps=20, box_codes=True)
    result = admm_quantize(model, train_set, config, epsilons={"hidden.0": 1e-4, "head": 1e-4})
    for index, (layer, center) in enumerate(zip(result.layers, centers, strict=True)):
        if index == 1:
            assert layer.box_violation is None and layer.box_feasible is None
            continue
        inside = center.abs() <= float(layer.scale) * grid_top(4)
        deviation = (layer.dequantize() - center).abs()
        assert float(deviation[inside].max()) <= float(layer.scale) / 2 + 1e-4 + 1e-6
        assert layer.box_feasible < 0.2 and layer.box_violation > 0


def test_paper_splitting_boxes_the_continuous_weights_only(digits):
    """Default (box on q G only): a tiny radius pins G to C / q, and the scaled dual u (|u| <= 1/2 after
    each V-step) keeps every code within one grid step of C / q; the final rounding leaves the box."""
    model, train_set, _ = digits
    centers = [module.weight.detach().clone() for _, module in quantizable_layers(model)]
    result = admm_quantize(
        model,
        train_set,
        ADMMConfig(bits=4, iterations=3, steps=20),
        epsilons=dict.fromkeys(["hidden.0", "hidden.2", "head"], 1e-6),
    )
    for layer, center in zip(result.layers, centers, strict=True):
        target = torch.clamp(center / layer.scale, -grid_top(4), grid_top(4))
        assert float((layer.codes.float() - target).abs().max()) <= 1 + 1e-3
        assert layer.box_violation > 0 and layer.epsilon == 1e-6


def test_codes_file_round_trip(tmp_path):
    result = _quantized("lb", 3)
    path = tmp_path / "model.codes.pt"
    save_codes(path, result, {"note": "test"})
    codes, metadata = load_codes(path)
    assert metadata["note"] == "test" and metadata["quantization"]["config"]["method"] == "lb"
    for layer in result.layers:
        assert torch.equal(codes[layer.name].codes, layer.codes) and torch.equal(codes[layer.name].scale, layer.scale)
    foreign = tmp_path / "foreign.pt"
    torch.save({"codes": {}}, foreign)
    with pytest.raises(CheckpointError, match="format marker"):
        load_codes(foreign)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"bits": 1}, "bits must be an integer in 2..8"),
        ({"bits": 9}, "bits must be an integer in 2..8"),
        ({"bits": ()}, "bits must be"),
        ({"method": "ADMM"}, "method must be one of"),
        ({"iterations": 0}, "iterations must be an integer >= 1"),
        ({"steps": 2.5}, "steps must be an integer"),
        ({"rho": 0.0}, "rho must be a finite number > 0"),
        ({"rho_growth": 0.5}, "rho_growth must be"),
        ({"lr": float("nan")}, "lr must be"),
        ({"momentum": 1.0}, "momentum must be in"),
        ({"box_codes": 1}, "box_codes must be True or False"),
    ],
)
def test_config_validation(options, message):
    with pytest.raises(ValueError, match=message):
        ADMMConfig(**options)


def test_argument_validation(digits):
    model, train_set, _ = digits
    with pytest.raises(ValueError, match="bits has 2 entries but the model has 3"):
        admm_quantize(model, train_set, ADMMConfig(bits=(4, 4)))
    with pytest.raises(ValueError, match=r"names \['hidden.1'\], which are not"):
        admm_quantize(model, train_set, ADMMConfig(), epsilons={"hidden.1": 0.1})
    with pytest.raises(TypeError, match="must map layer names"):
        admm_quantize(model, train_set, ADMMConfig(), epsilons=[0.1, 0.1, 0.1])
    with pytest.raises(ValueError, match=">= 0 or None"):
        admm_quantize(model, train_set, ADMMConfig(), epsilons={"hidden.0": 0.1, "hidden.2": -1.0})
    with pytest.raises(ValueError, match="no certificate constraint"):
        admm_quantize(model, train_set, ADMMConfig(method="lb"), epsilons={"head": 0.1})


def test_per_layer_bits(digits):
    model, train_set, _ = digits
    result = admm_quantize(model, train_set, ADMMConfig(bits=(8, 3, 2), iterations=1, steps=5))
    assert [layer.bits for layer in result.layers] == [8, 3, 2]
    assert [int(layer.codes.abs().max()) <= grid_top(layer.bits) for layer in result.layers] == [True] * 3
    assert int(result.layers[2].codes.abs().max()) == 1  # 2 bits: ternary codes
    by_name = admm_quantize(
        model, train_set, ADMMConfig(bits={"head": 2, "hidden.0": 8, "hidden.2": 3}, iterations=1, steps=5)
    )
    assert [layer.bits for layer in by_name.layers] == [8, 3, 2]
    with pytest.raises(ValueError, match="bits names layers"):
        admm_quantize(model, train_set, ADMMConfig(bits={"hidden.0": 8}))


class HeadFirst(nn.Module):
    """Registers its classifier before the conv it reads: registration order is not call order."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4 * 4 * 4, 3)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(F.relu(self.conv(x)), 1))  # (N, 1, 4, 4) -> (N, 3)


def test_certified_radii_land_on_the_layers_they_were_computed_for():
    """Each layer's certificate box is the radius certified for that layer (by name), whatever the
    order in which the model registers its modules."""
    torch.manual_seed(0)
    model = HeadFirst().eval()
    images = torch.rand(16, 1, 4, 4)
    labels = model(images).argmax(1)
    network = ReluNetwork.from_model(model)
    expected = {  # forward order: the conv is layer 0, the head layer 1
        name: float(np.percentile(certified_eps(network, images, labels, layers=(k,)).float().numpy(), 50))
        for k, name in enumerate(["conv", "head"])
    }
    assert expected["conv"] != pytest.approx(expected["head"], rel=0.1)  # a swap would show
    epsilons = certificate_epsilons(model, images, labels, 50)
    info = DatasetInfo("tiny", (1, 4, 4), ("a", "b", "c"), (0.0,), (1.0,))
    train_set = LatticeDataset((images * 255).round().to(torch.uint8), labels, info)
    result = admm_quantize(
        model, train_set, ADMMConfig(bits=8, iterations=1, steps=1, eval_images=4), epsilons=epsilons
    )
    assert {layer.name: layer.epsilon for layer in result.layers} == pytest.approx(expected, rel=1e-6)
