"""The arithmetic of 8-bit affine quantization, shared by fake-quant training and the integer engine.

Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
Inference" (CVPR 2018): a real value r is represented by an integer q as r = scale * (q - zero_point).
Activations are asymmetric uint8 (0..255) with a zero point that represents 0.0 exactly; weights are
symmetric int8 (-127..127, zero point 0) with one scale per output channel; biases are int32 in units
of input_scale * weight_scale. Rounding is half up, floor(x + 1/2), everywhere: in fake quantization,
in bias and weight rounding and in the engine's fixed-point requantization, so training sees the
rounding that deployment does.
"""

from __future__ import annotations

import math

import torch

UINT8_MAX = 255
INT8_MAX = 127  # weights use -127..127, symmetric, as in Jacob et al. (section 2.1)
MULTIPLIER_BITS = 31  # fixed-point multipliers are int32 in [2^30, 2^31)
MAX_SHIFT = 62  # a product of an int32 accumulator and a multiplier fits in 62 bits
MAX_INPUT_MARGIN = 16_000  # keeps the input step <= 127: see lattice_codes; 7.8 x the largest sampler sigma_int


def round_half_up(x: torch.Tensor) -> torch.Tensor:
    """floor(x + 1/2): the one rounding rule of the package (float in, float out)."""
    return torch.floor(x + 0.5)


def activation_qparams(min_val: torch.Tensor, max_val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (scale, zero_point) covering [min_val, max_val] widened to contain 0 (Jacob et al., 3.1).

    The zero point is an integer, so the real value 0 (ReLU's floor, zero padding) is exact.
    Returns float32 0-dim tensors; a degenerate range gets the smallest positive scale.
    """
    low = torch.clamp(min_val, max=0.0)
    high = torch.clamp(max_val, min=0.0)
    scale = torch.clamp((high - low) / UINT8_MAX, min=torch.finfo(torch.float32).eps)
    zero_point = torch.clamp(round_half_up(-low / scale), 0, UINT8_MAX)
    return scale, zero_point


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Round ``x`` to the uint8 grid of (scale, zero_point) in the forward pass; straight-through backward.

    The gradient is 1 inside the representable range and 0 outside it (the clipped straight-through
    estimator of Jacob et al., section 3).
    """
    x = torch.clamp(x, -zero_point * scale, (UINT8_MAX - zero_point) * scale)
    return x + (round_half_up(x / scale) * scale - x).detach()


def input_grid(margin: int) -> tuple[int, int]:
    """(step, zero_point) of the input quantizer whose uint8 codes cover the lattice values [-margin, 255 + margin].

    Code c stands for the lattice value (c - zero_point) * step, so the real input is
    (step / 255) * (c - zero_point). The step is the smallest odd integer for which codes 0 and 255
    reach -margin and 255 + margin: every lattice value in that range is then rounded by at most
    step / 2, none is clamped. Odd, so that v / step is never halfway between two codes and float fake
    quantization (QAT) rounds exactly as the integer division of ``lattice_codes`` does. Margin 0 gives
    (1, 0): the codes are the uint8 pixel values themselves.
    """
    if isinstance(margin, bool) or not isinstance(margin, int) or not 0 <= margin <= MAX_INPUT_MARGIN:
        raise ValueError(f"input_margin must be an int in [0, {MAX_INPUT_MARGIN}], got {margin!r}")
    step, zero_point = 1, margin
    while (UINT8_MAX - zero_point) * step < UINT8_MAX + margin:  # code 255 falls short of 255 + margin
        step += 2
        zero_point = -(-margin // step)  # ceil(margin / step): code 0 reaches -margin
    return step, zero_point


def lattice_codes(values: torch.Tensor, step: int, zero_point: int) -> torch.Tensor:
    """uint8 codes clamp(round_half_up(v / step) + zero_point, 0, 255) of integer lattice values v, integer-only.

    ``values`` is uint8 (images) or int16/int32/int64 (x + noise, unclipped); ``(step, zero_point)``
    comes from ``input_grid``. Step 1 (margin 0) is clamp(v, 0, 255), and uint8 images are returned as
    they are. Otherwise v is clamped to the lattice values of codes 0 and 255, [low, high], which gives
    the same codes; then, h = (step - 1) / 2 (the step is odd), code = floor((v - low + h) / step) with
    0 <= v - low + h < 256 step, computed exactly as ((v - low + h) * m) >> s with m = ceil(2^s / step),
    s = 8 + 2 bit_length(step): the error (v - low + h)(m step - 2^s) / (step 2^s) is < 1 / step
    (Granlund & Montgomery, PLDI 1994), and the product stays below 2^31 for step <= 127.
    """
    if step == 1:
        return values if values.dtype == torch.uint8 else values.clamp(0, UINT8_MAX).to(torch.uint8)
    low, high = -zero_point * step, (UINT8_MAX - zero_point) * step
    shift = 8 + 2 * step.bit_length()
    multiplier = -(-(1 << shift) // step)
    # uint8 images lie inside [low, high]; either way v is a fresh int32 tensor that may be changed in place
    v = values.to(torch.int32) if values.dtype == torch.uint8 else values.clamp(low, high).to(torch.int32)
    return v.sub_(low - step // 2).mul_(multiplier).bitwise_right_shift_(shift).to(torch.uint8)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8 weights: (q as float in -127..127, scale per channel).

    Shapes: weight (O, ...) -> q (O, ...), scale (O,).
    """
    amax = weight.detach().abs().flatten(1).amax(1)  # (O,)
    scale = torch.clamp(amax / INT8_MAX, min=torch.finfo(torch.float32).eps)
    view = (-1,) + (1,) * (weight.dim() - 1)
    q = torch.clamp(round_half_up(weight / scale.view(view)), -INT8_MAX, INT8_MAX)
    return q, scale


def fake_quantize_affine(
    weight: torch.Tensor, bias: torch.Tensor | None, in_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight rounded to its per-channel int8 grid and bias to its int32 grid (unit in_scale * weight_scale),
    as the integer engine stores them; straight-through gradients.

    Rounding the bias too matters: it removes the main difference between the QAT model's and the
    integer engine's outputs. Shapes: weight (O, ...), bias (O,) or None, in_scale 0-dim.
    """
    q, scale = quantize_weight(weight)
    dequantized = q * scale.view((-1,) + (1,) * (weight.dim() - 1))
    weight = weight + (dequantized - weight).detach()
    if bias is None:
        return weight, None
    acc_scale = in_scale * scale  # (O,)
    return weight, bias + (round_half_up(bias / acc_scale) * acc_scale - bias).detach()


def quantize_multiplier(real: float) -> tuple[int, int]:
    """A positive real multiplier as an int32 fixed-point number: real ~= multiplier / 2**shift.

    ``multiplier`` lies in [2^30, 2^31) so it keeps 31 significant bits (relative error <= 2^-31),
    as in gemmlowp and Jacob et al. (section 2.2, eq. 6). ``shift`` is in 1..62; multipliers below
    2^-32 (whose products with any int32 round to 0 or +-1) lose precision instead of overflowing.
    Raises ValueError for a non-finite, non-positive or too large (>= 2^30) ``real``.
    """
    if not (math.isfinite(real) and 0.0 < real < 2.0**30):
        raise ValueError(f"a requantization multiplier must be in (0, 2^30), got {real!r}")
    mantissa, exponent = math.frexp(real)  # real = mantissa * 2**exponent, mantissa in [0.5, 1)
    multiplier = math.floor(mantissa * 2**MULTIPLIER_BITS + 0.5)
    if multiplier == 2**MULTIPLIER_BITS:  # the mantissa rounded up to 1.0
        multiplier //= 2
        exponent += 1
    shift = MULTIPLIER_BITS - exponent
    if shift > MAX_SHIFT:
        return math.floor(math.ldexp(real, MAX_SHIFT) + 0.5), MAX_SHIFT
    return multiplier, shift


def quantize_multipliers(reals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_multiplier`` for each entry of a 1-d tensor: (multipliers, shifts), both int32."""
    pairs = [quantize_multiplier(float(r)) for r in reals.tolist()]
    multipliers, shifts = zip(*pairs)
    return torch.tensor(multipliers, dtype=torch.int32), torch.tensor(shifts, dtype=torch.int32)


def rounding_right_shift(x: torch.Tensor, shift: torch.Tensor | int) -> torch.Tensor:
    """floor(x / 2**shift + 1/2) on int64 tensors, exactly (shift >= 1, per element or shared)."""
    if isinstance(shift, int):
        return (x + (1 << (shift - 1))) >> shift
    shift = shift.to(torch.int64)
    return (x + torch.bitwise_left_shift(torch.ones_like(shift), shift - 1)) >> shift


def requantize(acc: torch.Tensor, multiplier: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """round(acc * multiplier / 2**shift) in int64 with a single rounding, broadcast over the last dim.

    This is the exactly rounded variant of gemmlowp's SaturatingRoundingDoublingHighMul followed by
    RoundingDivideByPOT (TFLite's single-rounding mode): |acc| < 2^31 and multiplier < 2^31 keep the
    product within int64.
    """
    return rounding_right_shift(acc.to(torch.int64) * multiplier.to(torch.int64), shift)


def pad_channels(x: torch.Tensor, padding: tuple[int, int], values: torch.Tensor) -> torch.Tensor:
    """Pad (N, C, H, W) by ``padding`` = (ph, pw) on each side with a per-channel constant ``values`` (C,).

    Works for float (differentiably) and integer tensors alike. Shapes: -> (N, C, H + 2ph, W + 2pw).
    """
    ph, pw = padding
    n, c, h, w = x.shape
    out = values.to(x.dtype).view(1, c, 1, 1).expand(n, c, h + 2 * ph, w + 2 * pw).clone()
    out[:, :, ph : ph + h, pw : pw + w] = x
    return out
