"""Tests for qrobust.quant.lowbit: projections against brute force, and BinaryConnect / Binary-Relax training."""

from __future__ import annotations

import io
import itertools
import math

import pytest
import torch
from torch import nn

from qrobust.models import build_model, model_names
from qrobust.quant.lowbit import LowBitConfig, WeightQuantizer, lowbit_project, lowbit_quantize, max_code

from .conftest import SHAPES, make_info


def distance(weight: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor | float) -> float:
    """||w - scale * codes||^2 in float64."""
    return float(((weight.double() - torch.as_tensor(scale).double() * codes.double()) ** 2).sum())


def least_squares(weight: torch.Tensor, codes: torch.Tensor) -> float:
    """min over scale >= 0 of ||w - scale * codes||^2 (codes fixed)."""
    w, c = weight.double().flatten(), codes.double().flatten()
    if not c.any():
        return float(w @ w)
    return float(w @ w - max(float(w @ c), 0.0) ** 2 / float(c @ c))


def weights(seed: int, shape: tuple[int, ...] = (8, 4, 3, 3), heavy_tails: bool = False) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=generator)
    return w**3 if heavy_tails else w  # cubed Gaussians: far outliers, as trained weights sometimes have


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def tiny_batch(seed: int = 1, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 6, 6, generator=generator), torch.randint(0, 3, (n,), generator=generator)


def step(model: nn.Module, quantizer: WeightQuantizer, optimizer: torch.optim.Optimizer, x, y) -> float:
    """One BC/BR step as the training loop does it; the loss is at u."""
    with quantizer.applied():
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
    optimizer.step()
    return loss.item()


# --- projections ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_binary_projection_is_mean_abs_times_sign_with_two_values(seed: int) -> None:
    w = weights(seed)
    w[0, 0, 0, 0] = 0.0  # sign(0) -> +1
    codes, scale = lowbit_quantize(w, 1)
    assert codes.dtype == torch.int8 and codes.shape == w.shape
    assert set(codes.unique().tolist()) == {-1, 1} and codes[0, 0, 0, 0] == 1
    assert torch.equal(codes, torch.where(w >= 0, 1, -1).to(torch.int8))
    assert float(scale) == pytest.approx(float(w.abs().mean()), rel=1e-6)
    assert lowbit_project(w, 1).unique().numel() == 2


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_codes_stay_in_the_signed_range_and_count_at_most_2m_plus_1_values(bits: int) -> None:
    top = max_code(bits)
    assert top == {1: 1, 2: 1, 3: 3, 4: 7, 8: 127}[bits]
    for seed in range(3):
        w = weights(seed, (16, 8, 3, 3))
        codes, scale = lowbit_quantize(w, bits)
        assert int(codes.abs().max()) <= top and float(scale) > 0
        values = lowbit_project(w, bits).unique()
        assert values.numel() <= (2 if bits == 1 else 2 * top + 1)
        assert (0.0 in values.tolist()) == (bits >= 2)  # zero is a level from ternary up
        if bits >= 2:  # two's complement m-bit codes (binary stores the sign bit)
            assert -(2 ** (bits - 1)) <= int(codes.min()) and int(codes.max()) <= 2 ** (bits - 1) - 1
    assert lowbit_project(weights(0, (16, 8, 3, 3)), 4).unique().numel() <= 15


@pytest.mark.parametrize("bits", [1, 2])
@pytest.mark.parametrize("seed", range(6))
def test_binary_and_ternary_projections_are_optimal_by_brute_force(bits: int, seed: int) -> None:
    """Against every code pattern (each with its least-squares scale) and a fine grid of scales."""
    w = weights(seed, (7,))
    if seed == 5:  # ties and zeros
        w = torch.tensor([0.5, -0.5, 0.5, 0.0, 0.25, -0.25, 0.0])
    codes, scale = lowbit_quantize(w, bits)
    ours = distance(w, codes, scale)
    levels = (-1, 1) if bits == 1 else (-1, 0, 1)
    exact = min(least_squares(w, torch.tensor(pattern)) for pattern in itertools.product(levels, repeat=len(w)))
    assert ours == pytest.approx(exact, rel=1e-6, abs=1e-9)
    signs = torch.where(w >= 0, 1.0, -1.0)
    on_grid = [  # for each scale s, its best codes: signs (binary) or rounding to {0, +-1} (ternary)
        distance(w, torch.clamp(torch.round(w.double() / s), -1, 1) if bits == 2 else signs, s)
        for s in torch.linspace(1e-3, float(w.abs().max()) * 1.5, 2000, dtype=torch.float64)
    ]
    assert ours <= min(on_grid) + 1e-9
    if bits == 2:  # the best top-k set, k = 1..n, with its mean as scale
        ordered = w.abs().sort(descending=True).values.double()
        best_k = max(float(ordered[:k].sum()) ** 2 / k for k in range(1, len(w) + 1))
        assert ours == pytest.approx(float(w.double() @ w.double()) - best_k, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("heavy_tails", [False, True])
def test_mbit_search_never_ends_worse_than_its_start(bits: int, heavy_tails: bool) -> None:
    for seed, shape in itertools.product(range(4), [(5,), (9,), (3, 16), (8, 4, 3, 3)]):
        w = weights(seed, shape, heavy_tails)
        results = [distance(w, *lowbit_quantize(w, bits, iterations=k)) for k in (0, 1, 2, 5, 50)]
        assert all(later <= earlier for earlier, later in itertools.pairwise(results)), results


@pytest.mark.parametrize("bits", [3, 4])
def test_mbit_search_stops_at_a_fixed_point_of_both_steps(bits: int) -> None:
    """A local optimum: the codes are the rounding for the scale, the scale (nearly) least squares for the codes."""
    for seed in range(4):
        w = weights(seed, (8, 4, 3, 3), heavy_tails=seed % 2 == 1)
        codes, scale = lowbit_quantize(w, bits, iterations=1000)
        top = max_code(bits)
        assert torch.equal(codes, torch.clamp(torch.round(w.double() / scale.double()), -top, top).to(torch.int8))
        ours = distance(w, codes, scale)
        assert least_squares(w, codes) >= ours * (1 - 1e-6)


def test_mbit_search_is_close_to_the_global_optimum_on_gaussian_weights() -> None:
    """Exact reference: the codes are round(w / s) for the optimal s, so the optimum is among the code
    patterns met as s decreases; each change raises one code by 1, so sweeping sorted breakpoints works."""
    top = max_code(4)
    for seed in range(3):
        w = weights(seed, (16, 8, 3, 3)).double().flatten()
        magnitudes = w.abs()
        steps = torch.arange(top, dtype=torch.float64)
        breakpoints = (magnitudes[:, None] / (steps + 0.5)).flatten()  # |q_i| passes k at s = |w_i| / (k + 1/2)
        order = breakpoints.argsort(descending=True)
        gain = magnitudes[:, None].expand(-1, top).flatten()[order].cumsum(0)  # sum |w_i| q_i
        norm = (2 * steps + 1).expand(len(w), -1).flatten()[order].cumsum(0)  # sum q_i^2
        optimum = float(w @ w - (gain**2 / norm).max())
        assert distance(w, *lowbit_quantize(w, 4)) <= optimum * 1.01


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_projecting_a_point_of_q_returns_it_unchanged(bits: int) -> None:
    generator = torch.Generator().manual_seed(bits)
    top = max_code(bits)
    for largest in sorted({1, max(1, top // 2), top}):  # also points that do not use the top levels
        if bits == 1:
            codes = torch.where(torch.rand(40, generator=generator) < 0.5, -1, 1)
        else:
            codes = torch.randint(-largest, largest + 1, (40,), generator=generator)
            codes[:2] = torch.tensor([largest, 0])
        w = 0.375 * codes.float()
        quantized = lowbit_quantize(w, bits)
        assert torch.equal(quantized.codes, codes.to(torch.int8)) and float(quantized.scale) == 0.375
        assert torch.equal(lowbit_project(w, bits), w)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_all_zero_weights_project_to_zero(bits: int) -> None:
    w = torch.zeros(3, 2)
    assert torch.equal(lowbit_project(w, bits), w) and float(lowbit_quantize(w, bits).scale) == 0.0


@pytest.mark.parametrize(
    "weight, bits, match",
    [
        (torch.ones(3), 0, "bits must be"),
        (torch.ones(3), 9, "bits must be"),
        (torch.ones(3), True, "bits must be"),
        (torch.tensor([1.0, math.nan]), 1, "non-finite"),
        (torch.tensor([1.0, math.inf]), 4, "non-finite"),
        (torch.ones(3, dtype=torch.int64), 1, "float tensor"),
        (torch.ones(0), 1, "non-empty"),
    ],
)
def test_projection_rejects_bad_input(weight: torch.Tensor, bits: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        lowbit_quantize(weight, bits)


# --- WeightQuantizer -----------------------------------------------------------------------------


def test_relaxed_weights_interpolate_lambda_grows_by_rho_and_cutoff_switches_to_projection() -> None:
    model = tiny_model()
    w = {name: p.detach().clone() for name, p in [("0", model[0].weight), ("3", model[3].weight)]}
    projected = {name: lowbit_project(weight, 2) for name, weight in w.items()}
    quantizer = WeightQuantizer(model, bits=2, method="br", rho=2.0, cutoff_epoch=2)
    for epoch, lam in enumerate([1.0, 2.0, 4.0, 8.0]):
        assert quantizer.lam == lam and quantizer.epoch == epoch and quantizer.relaxed == (epoch < 2)
        with quantizer.applied():
            for name, param in [("0", model[0].weight), ("3", model[3].weight)]:
                if epoch == 0:
                    assert torch.equal(param, (projected[name] + w[name]) / 2)  # the midpoint
                if epoch < 2:
                    assert torch.allclose(param, (lam * projected[name] + w[name]) / (lam + 1))
                else:
                    assert torch.equal(param, projected[name])  # BinaryConnect, exactly
        for name, param in [("0", model[0].weight), ("3", model[3].weight)]:
            assert torch.equal(param, w[name])  # w is back
        quantizer.end_epoch()


def test_binaryconnect_always_uses_the_projection() -> None:
    model = tiny_model()
    quantizer = WeightQuantizer(model, bits=1, method="bc", rho=1.5, cutoff_epoch=5)
    w = model[0].weight.detach().clone()
    with quantizer.applied():
        assert torch.equal(model[0].weight, lowbit_project(w, 1))


def test_sgd_moves_float_weights_by_the_gradient_taken_at_u() -> None:
    model, (x, y) = tiny_model(), tiny_batch()
    quantizer = WeightQuantizer(model, bits=1, method="br", rho=1.1, cutoff_epoch=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with quantizer.applied():
        at_u = {name: p.detach().clone() for name, p in model.named_parameters()}
        nn.functional.cross_entropy(model(x), y).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    optimizer.step()
    for name, param in model.named_parameters():
        assert torch.allclose(param, before[name] - 0.1 * grads[name], rtol=0, atol=1e-7)
    assert not torch.equal(at_u["0.weight"], before["0.weight"])  # the gradient was taken elsewhere
    assert torch.equal(at_u["0.bias"], before["0.bias"])  # biases are not quantized


def test_short_training_lowers_the_loss_and_leaves_float_weights_outside_the_block() -> None:
    model, (x, y) = tiny_model(), tiny_batch()
    quantizer = WeightQuantizer(model, bits=1, method="br", rho=1.5, cutoff_epoch=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    losses = []
    for _ in range(4):
        losses += [step(model, quantizer, optimizer, x, y) for _ in range(10)]
        quantizer.end_epoch()
    assert sum(losses[-10:]) / 10 < 0.6 * losses[0]  # 1.10 -> 0.50 here; binary steps make it noisy
    weight = model[0].weight
    assert weight.unique().numel() > 2  # float w, not binary u
    assert torch.equal(weight, quantizer.float_weights()["0"])
    with quantizer.applied():
        assert weight.unique().numel() == 2  # past the cut-off: binary


def test_applied_restores_float_weights_after_an_exception_and_does_not_nest() -> None:
    model = tiny_model()
    quantizer = WeightQuantizer(model, bits=4, method="bc")
    w = model[3].weight.detach().clone()
    with pytest.raises(KeyError), quantizer.applied():
        raise KeyError("boom")
    assert torch.equal(model[3].weight, w)
    with quantizer.applied(), pytest.raises(RuntimeError, match="does not nest"), quantizer.applied():
        pass


def test_backward_after_leaving_the_block_fails_loudly() -> None:
    model, (x, y) = tiny_model(), tiny_batch()
    quantizer = WeightQuantizer(model, bits=1, method="bc")
    with quantizer.applied():
        loss = nn.functional.cross_entropy(model(x), y)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_state_dict_round_trip_reproduces_the_next_step_exactly() -> None:
    (x, y), (x2, y2) = tiny_batch(1), tiny_batch(2)
    model = tiny_model(0)
    quantizer = WeightQuantizer(model, bits=4, method="br", rho=1.3, cutoff_epoch=5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        step(model, quantizer, optimizer, x, y)
        quantizer.end_epoch()
    buffer = io.BytesIO()  # a checkpoint stores the low-bit model, the quantizer and the optimizer
    torch.save([quantizer.projected_state_dict(), quantizer.state_dict(), optimizer.state_dict()], buffer)
    buffer.seek(0)
    model_state, quantizer_state, optimizer_state = torch.load(buffer)

    resumed = tiny_model(seed=7)
    resumed.load_state_dict(model_state)
    resumed_quantizer = WeightQuantizer(resumed, bits=4, method="br", rho=1.3, cutoff_epoch=5)
    resumed_quantizer.load_state_dict(quantizer_state)
    resumed_optimizer = torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9)
    resumed_optimizer.load_state_dict(optimizer_state)
    assert (resumed_quantizer.lam, resumed_quantizer.epoch) == (quantizer.lam, quantizer.epoch) == (1.3**2, 2)

    losses = step(model, quantizer, optimizer, x2, y2), step(resumed, resumed_quantizer, resumed_optimizer, x2, y2)
    assert losses[0] == losses[1]
    for (name, param), resumed_param in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(param, resumed_param), name


def test_load_state_dict_rejects_another_config_or_other_layers() -> None:
    state = WeightQuantizer(tiny_model(), bits=2, method="br").state_dict()
    with pytest.raises(ValueError, match="config"):
        WeightQuantizer(tiny_model(), bits=4, method="br").load_state_dict(state)
    with pytest.raises(ValueError, match="layers"):
        WeightQuantizer(tiny_model(), bits=2, method="br", layers=["0"]).load_state_dict(state)


def test_export_codes_times_scale_is_the_projected_model_and_finalize_writes_it() -> None:
    model = tiny_model()
    quantizer = WeightQuantizer(model, bits=4, method="br")
    exported = quantizer.export()
    projected = quantizer.projected_state_dict()
    assert sorted(exported) == ["0", "3"]
    for name, (codes, scale) in exported.items():
        assert codes.dtype == torch.int8 and scale.dim() == 0
        assert torch.equal(codes.float() * scale, projected[f"{name}.weight"])
        assert torch.equal(projected[f"{name}.weight"], lowbit_project(model.get_submodule(name).weight, 4))
    assert torch.equal(projected["0.bias"], model[0].bias)  # not quantized
    quantizer.finalize()
    for key, value in model.state_dict().items():
        assert torch.equal(value, projected[key]), key


def test_layers_restrict_what_is_quantized() -> None:
    model = tiny_model()
    quantizer = WeightQuantizer(model, bits=1, method="bc", layers=["3"])
    first = model[0].weight.detach().clone()
    with quantizer.applied():
        assert torch.equal(model[0].weight, first)
        assert model[3].weight.unique().numel() == 2
    assert list(quantizer.export()) == ["3"]


@pytest.mark.parametrize("name", model_names())
def test_every_registered_model_gets_binary_weights_inside_and_float_weights_back(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, make_info(SHAPES.get(name, (3, 8, 8))))  # EnResNets: Binary-Relax, not int8
    before = {key: value.clone() for key, value in model.state_dict().items()}
    quantizer = WeightQuantizer(model, bits=1, method="bc")
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(quantizer.layers) == len(layers)
    with quantizer.applied():
        assert all(layer.weight.unique().numel() == 2 for layer in layers)
    after = model.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"bits": 0, "method": "br"}, "bits must be"),
        ({"bits": 9, "method": "br"}, "bits must be"),
        ({"bits": 2, "method": "xnor"}, "method must be one of"),
        ({"bits": 2, "method": "br", "rho": 1.0}, "rho must be"),
        ({"bits": 2, "method": "br", "rho": math.inf}, "rho must be"),
        ({"bits": 2, "method": "br", "cutoff_epoch": -1}, "cutoff_epoch must be"),
        ({"bits": 2, "method": "br", "cutoff_epoch": 2.5}, "cutoff_epoch must be"),
        ({"bits": 2, "method": "br", "layers": ["1"]}, "not Conv2d or Linear"),
        ({"bits": 2, "method": "br", "layers": ["nope"]}, "not Conv2d or Linear"),
        ({"bits": 2, "method": "br", "layers": "0"}, "collection of module names"),
        ({"bits": 2, "method": "br", "layers": []}, "no layers to quantize"),
    ],
)
def test_quantizer_rejects_bad_options(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        WeightQuantizer(tiny_model(), **options)


def test_quantizer_rejects_a_model_without_conv_or_linear_layers() -> None:
    with pytest.raises(ValueError, match="no layers to quantize"):
        WeightQuantizer(nn.Sequential(nn.ReLU(), nn.Flatten()), bits=1, method="bc")


def test_config_round_trips_through_a_dict() -> None:
    quantizer = WeightQuantizer(tiny_model(), bits=4, method="br", rho=1.02, cutoff_epoch=10)
    assert LowBitConfig(**quantizer.state_dict()["config"]) == quantizer.config == LowBitConfig(4, "br", 1.02, 10)
