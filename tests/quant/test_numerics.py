"""Tests for qrobust.quant.numerics: fixed-point requantization against exact rational arithmetic."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest
import torch

from qrobust.quant.numerics import (
    activation_qparams,
    fake_quantize,
    fake_quantize_affine,
    input_grid,
    lattice_codes,
    pad_channels,
    quantize_multiplier,
    quantize_weight,
    requantize,
    rounding_right_shift,
)


def round_half_up(value: Fraction) -> int:
    return math.floor(value + Fraction(1, 2))


def random_cases(count: int, seed: int) -> list[tuple[int, float]]:
    """(int32 accumulator, positive real multiplier) pairs over the ranges the engine meets, and edges."""
    rng = random.Random(seed)
    cases = [(rng.randint(-(2**31) + 1, 2**31 - 1), 2.0 ** rng.uniform(-40, 8)) for _ in range(count)]
    cases += [(rng.randint(-(2**20), 2**20), 2.0 ** rng.uniform(-12, 0)) for _ in range(count)]
    cases += [(2**31 - 1, 0.9999999999), (-(2**31) + 1, 0.5), (0, 1e-3), (3, 0.5), (-3, 0.5), (5, 0.1)]
    return cases


def test_quantize_multiplier_keeps_31_bits() -> None:
    for _, real in random_cases(500, seed=0):
        multiplier, shift = quantize_multiplier(real)
        error = abs(Fraction(multiplier, 2**shift) - Fraction(real))
        if shift < 62:
            assert 2**30 <= multiplier < 2**31 and shift >= 1
            assert error <= Fraction(real) / 2**31
        else:  # below 2^-32 the shift is capped: absolute error 2^-63, harmless for int32 accumulators
            assert error <= Fraction(1, 2**63)


def test_requantize_is_exactly_rounded_fixed_point_product() -> None:
    cases = random_cases(2000, seed=1)
    pairs = [quantize_multiplier(real) for _, real in cases]
    acc = torch.tensor([a for a, _ in cases], dtype=torch.int32)
    got = requantize(
        acc,
        torch.tensor([m for m, _ in pairs], dtype=torch.int32),
        torch.tensor([s for _, s in pairs], dtype=torch.int32),
    )
    assert got.dtype == torch.int64
    for (a, real), (m, s), value in zip(cases, pairs, got.tolist()):
        assert value == round_half_up(Fraction(a * m, 2**s))  # the fixed-point product, rounded once
        exact = Fraction(a) * Fraction(real)  # and within 1/2 of the true real product, up to 2^-31
        assert abs(value - exact) <= Fraction(1, 2) + abs(exact) / 2**31


def test_rounding_right_shift_rounds_half_up_for_negatives_too() -> None:
    x = torch.tensor([-6, -5, -3, -2, 2, 3, 5, 6], dtype=torch.int64)
    assert rounding_right_shift(x, 1).tolist() == [-3, -2, -1, -1, 1, 2, 3, 3]
    shifts = torch.tensor([1, 1, 1, 1, 2, 2, 2, 2])
    assert rounding_right_shift(x, shifts).tolist() == [-3, -2, -1, -1, 1, 1, 1, 2]


@pytest.mark.parametrize("real", [0.0, -1.0, math.inf, math.nan, 2.0**30])
def test_quantize_multiplier_rejects_bad_values(real: float) -> None:
    with pytest.raises(ValueError, match="multiplier must be in"):
        quantize_multiplier(real)


def test_activation_qparams_cover_the_range_and_represent_zero() -> None:
    for low, high in [(-1.3, 2.7), (0.0, 5.0), (0.4, 3.0), (-2.0, -0.5)]:
        scale, zero_point = activation_qparams(torch.tensor(low), torch.tensor(high))
        assert float(zero_point) == int(zero_point) and 0 <= zero_point <= 255
        assert -zero_point * scale <= min(low, 0.0) + 1e-6 and (255 - zero_point) * scale >= max(high, 0.0) - scale


def test_fake_quantize_rounds_to_grid_with_clipped_straight_through_gradient() -> None:
    scale, zero_point = torch.tensor(0.1), torch.tensor(10.0)
    x = torch.tensor([-2.0, -0.26, 0.0, 0.04, 0.05, 3.0, 30.0], requires_grad=True)
    y = fake_quantize(x, scale, zero_point)
    expected = torch.tensor([-1.0, -0.3, 0.0, 0.0, 0.1, 3.0, 24.5])  # clipped to [-1.0, 24.5], half up
    assert torch.allclose(y, expected, atol=1e-6)
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]


def test_weights_are_per_channel_symmetric_int8_and_bias_int32() -> None:
    torch.manual_seed(0)
    weight = torch.randn(4, 3, 3, 3) * torch.tensor([1.0, 0.1, 10.0, 0.0]).view(4, 1, 1, 1)
    q, scale = quantize_weight(weight)
    assert q.abs().max() <= 127 and torch.equal(q, q.round())
    assert torch.equal(q.flatten(1).abs().amax(1)[:3], torch.full((3,), 127.0))  # each channel uses its range
    bias = torch.randn(4)
    w, b = fake_quantize_affine(weight, bias, torch.tensor(0.02))
    assert torch.allclose(w, q * scale.view(4, 1, 1, 1))
    units = b / (0.02 * scale)
    assert torch.allclose(units, units.round(), atol=1e-3)


def test_pad_channels_uses_one_value_per_channel() -> None:
    x = torch.zeros(1, 2, 2, 3, dtype=torch.uint8)
    out = pad_channels(x, (1, 2), torch.tensor([7, 9], dtype=torch.uint8))
    assert out.shape == (1, 2, 4, 7) and out.dtype == torch.uint8
    assert out[0, 0, 0, 0] == 7 and out[0, 1, -1, -1] == 9 and int(out[:, :, 1:3, 2:5].sum()) == 0


@pytest.mark.parametrize("margin", [0, 1, 100, 254, 255, 256, 383, 510, 765, 4000])
def test_input_grid_covers_the_margin_with_an_odd_step(margin: int) -> None:
    """Every lattice value in [-margin, 255 + margin] gets its nearest code value (error <= step // 2),
    none is clamped, and the step is the smallest odd one for which that holds."""
    step, zero_point = input_grid(margin)
    assert step % 2 == 1 and 0 <= zero_point <= 255
    v = torch.arange(-margin - 3 * step, 256 + margin + 3 * step, dtype=torch.int32)
    codes = lattice_codes(v, step, zero_point).long()
    exact = [min(max(round_half_up(Fraction(int(value), step)) + zero_point, 0), 255) for value in v]
    assert codes.tolist() == exact
    inside = (v >= -margin) & (v <= 255 + margin)
    assert int(((codes[inside] - zero_point) * step - v[inside]).abs().max()) <= step // 2
    if step > 1:  # the next smaller odd step cannot reach both ends
        smaller = step - 2
        assert all((255 - z) * smaller < 255 + margin for z in range(-(-margin // smaller), 256))


def test_margin_zero_codes_are_the_clipped_lattice_values() -> None:
    """Margin 0 is the old behaviour exactly: codes clamp(v, 0, 255), uint8 images passed through."""
    assert input_grid(0) == (1, 0)
    v = torch.arange(-600, 900, dtype=torch.int16).view(1, 1, 30, 50)
    for values in (v, v.int(), v.long()):
        assert torch.equal(lattice_codes(values, 1, 0), v.clamp(0, 255).to(torch.uint8))
    images = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    assert lattice_codes(images, 1, 0) is images


def test_lattice_codes_saturate_extreme_values_without_overflow() -> None:
    step, zero_point = input_grid(255)
    v = torch.tensor([-(2**31), -(2**15), -256, 510, 2**15 - 1, 2**31 - 1], dtype=torch.int64)
    assert lattice_codes(v, step, zero_point).tolist() == [0, 0, 0, 255, 255, 255]
    assert lattice_codes(v.to(torch.int32), step, zero_point).tolist() == [0, 0, 0, 255, 255, 255]


@pytest.mark.parametrize("margin", [-1, 2**15, 1.5, True, "3"])
def test_input_grid_rejects_bad_margins(margin) -> None:
    with pytest.raises(ValueError, match="input_margin must be an int"):
        input_grid(margin)
