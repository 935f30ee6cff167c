"""A certificate that an int8 model made by ``qrobust.quant`` predicts what its float model predicts.

Beyond Weng et al. (AAAI 2020), who bound quantization as a weight perturbation: here every source of
difference between the float model and the integer engine is bounded, layer by layer, as bounded noise
around the float network, and interval bound propagation (``qrobust.bounds.interval``) carries the
boxes to the logits:

* weights and biases: the dequantized int8 weights W_q = q * weight_scale and int32 biases
  b_q = q_b * in_scale * weight_scale differ from the float (folded) ones by exactly |W_q - W| and
  |b_q - b|, used as elementwise radii;
* activations: each requantized activation is the real pre-activation y, times the fixed-point
  multiplier's relative error (1 + delta), rounded to its uint8 grid (+- half a step) and clipped to
  the grid's range; so the next layer reads clamp(relu(y) + n) with |n| <= step / 2 + 2 delta (M + step)
  (M the largest |value| on the grid: beyond 2 (M + step) both sides saturate alike);
* input: the lattice value v is read exactly for margin 0, and rounded to the odd input step
  otherwise (+- (step - 1) / 2 / 255); a first conv pads with the grid value nearest the mean;
* logits: int32 logits are round(y (1 + delta) / s) in units of the logit scale s.

If the lower bound of the int8 model's real-valued logit margin f_c - f_j (c the float model's
prediction) is > 0 for every j, the int8 engine's argmax is c: the int8 model provably agrees.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from qrobust.bounds.interval import interval_logits, interval_margins
from qrobust.bounds.network import ReluNetwork, as_unit_images
from qrobust.bounds.perturbation import AffineNoise
from qrobust.quant.engine import Int8Model, IntConv2d, IntFlatten, IntLinear, IntMaxPool2d
from qrobust.quant.numerics import UINT8_MAX


@dataclass(frozen=True)
class QuantizationNoise:
    """The int8 model as its float network plus bounded noise (module docstring).

    ``network`` is the float network (with the int8 model's pad values in a first conv), ``noise[k]``
    bounds layer k's weight, bias and input differences; int32 logit j, times ``logit_step``, lies within
    logit_step / 2 + 2 ``logit_relative_error`` |y_j| of the real logit y_j the noisy network computes.
    """

    network: ReluNetwork
    noise: dict[int, AffineNoise]
    logit_step: float
    logit_relative_error: float


@dataclass(frozen=True)
class QuantizationCertificate:
    """Per-input result of ``verify_quantization``.

    Attributes:
        certified: (N,) bool, True where the int8 prediction provably equals the float one.
        float_predictions: (N,) the float model's predictions.
        margin_lower: (N,) lower bound of the int8 model's real logit margin to the runner-up (> 0: certified).
        logit_lower, logit_upper: (N, classes) bounds of the int8 model's logits in real units
            (int32 logits times ``Int8Model.logit_scale``).
    """

    certified: torch.Tensor
    float_predictions: torch.Tensor
    margin_lower: torch.Tensor
    logit_lower: torch.Tensor
    logit_upper: torch.Tensor

    @property
    def fraction(self) -> float:
        """The fraction of inputs certified."""
        return float(self.certified.to(torch.float64).mean()) if len(self.certified) else 0.0


def quantization_noise(float_model: nn.Module | ReluNetwork, int8_model: Int8Model) -> QuantizationNoise:
    """Bound every difference between ``int8_model`` and the float network it was converted from.

    Raises ValueError if the int8 program is not a chain matching the float network layer for layer.
    """
    if not isinstance(int8_model, Int8Model):
        raise ValueError(
            f"int8_model must be an Int8Model (qrobust.quant.load_int8(path).model), got {type(int8_model).__name__}"
        )
    network = float_model if isinstance(float_model, ReluNetwork) else ReluNetwork.from_model(float_model)
    network = network.to(torch.float64)
    if any(args != (step,) for step, args in enumerate(int8_model.inputs)):
        raise ValueError(
            "the int8 model is not a chain of layers (it has residual connections); only mlp/cnn-like models can be verified"
        )
    if not all(isinstance(op, (IntLinear, IntConv2d, IntMaxPool2d, IntFlatten)) for op in int8_model.ops):
        raise ValueError("the int8 model has ops other than linear, conv, max pooling and flatten")
    affine = [(step, op) for step, op in enumerate(int8_model.ops) if isinstance(op, (IntLinear, IntConv2d))]
    shapes = [tuple(op.weight.shape) for _, op in affine]
    if shapes != [tuple(layer.weight.shape) for layer in network.layers]:
        raise ValueError(
            f"the int8 model's layers {shapes} do not match the float model's {[tuple(layer.weight.shape) for layer in network.layers]}"
        )
    qparams = int8_model.value_qparams
    # per value: (relu, relative error) of the affine op that last wrote it (value 0: the input)
    producer: list[tuple[bool, float]] = [(False, 0.0)]
    relative = {}
    for step, op in enumerate(int8_model.ops):
        if isinstance(op, (IntLinear, IntConv2d)):
            relative[step] = _relative_error(op, qparams[step][0], qparams[step + 1][0])
            producer.append((op.relu, relative[step]))
        else:
            producer.append(producer[step])
    noise = {}
    for k, (step, op) in enumerate(affine):
        layer = network.layers[k]
        in_scale, in_zero = qparams[step]
        view = (-1,) + (1,) * (op.weight.dim() - 1)
        weight = op.weight.double() * op.weight_scale.view(view)
        bias = op.bias.double() * in_scale * op.weight_scale
        high = (UINT8_MAX - in_zero) * in_scale
        if step == 0:
            input_noise, low = (int8_model.input_step - 1) / 2 / UINT8_MAX, -in_zero * in_scale
            if isinstance(op, IntConv2d) and any(op.padding):
                pad_value = (op.pad_value.double() - in_zero) * in_scale
                network = network.replace_layer(k, replace(layer, pad_value=pad_value))
        else:
            relu, delta = producer[step]
            input_noise = in_scale / 2 + 2 * delta * (max(in_zero, UINT8_MAX - in_zero) * in_scale + in_scale)
            low = 0.0 if relu else -in_zero * in_scale
        noise[k] = AffineNoise((weight - layer.weight).abs(), (bias - layer.bias).abs(), input_noise, (low, high))
    return QuantizationNoise(network, noise, qparams[-1][0], relative[affine[-1][0]])


def verify_quantization(
    float_model: nn.Module, int8_model: Int8Model, images: torch.Tensor, *, batch_size: int = 256
) -> QuantizationCertificate:
    """Certify, per input, that ``int8_model`` predicts what ``float_model`` predicts.

    Guarantee: where ``certified`` is True, the integer reference engine's argmax on the image equals
    the float model's argmax (computed here in float32, eval mode), whatever rounding the engine does
    within the bounds of the module docstring (so also any backend that rounds within them). The
    bounds are computed in float64.

    Args:
        float_model: the float model the int8 model was converted from (``mlp``, ``cnn``-like chains); run in
            evaluation mode, its mode is restored.
        int8_model: its ``Int8Model`` (``convert`` or ``load_int8``).
        images: uint8 lattice images (N, C, H, W), or [0, 1] floats on the k / 255 grid.
        batch_size: inputs bounded at once.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    x = as_unit_images(images, torch.float64)
    if images.is_floating_point() and not torch.allclose(x * UINT8_MAX, (x * UINT8_MAX).round(), atol=1e-4, rtol=0):
        raise ValueError(
            "float images must lie on the uint8 lattice (multiples of 1/255), as the int8 model reads them"
        )
    x = (x * UINT8_MAX).round() / UINT8_MAX
    bounds = quantization_noise(float_model, int8_model)
    was_training = float_model.training
    float_model.eval()
    parts = []
    try:
        for start in range(0, len(x), batch_size):
            chunk = x[start : start + batch_size]
            with torch.no_grad():
                predictions = float_model(chunk.float()).argmax(1)
            parts.append((predictions, *_int8_margins(bounds, chunk, predictions)))
    finally:
        float_model.train(was_training)
    predictions, margins, lower, upper = (torch.cat(values) for values in zip(*parts))
    return QuantizationCertificate(margins > 0, predictions, margins, lower, upper)


def _int8_margins(bounds: QuantizationNoise, x: torch.Tensor, predictions: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(margin lower bound (N,), logit lower (N, K), logit upper (N, K)) of the int8 model's real logits."""
    with torch.no_grad():
        lower, upper = interval_logits(bounds.network, x, noise=bounds.noise)
        rounding = bounds.logit_step / 2 + 2 * bounds.logit_relative_error * torch.maximum(
            lower.abs(), upper.abs()
        )  # (N, K)
        margins = interval_margins(bounds.network, x, predictions, noise=bounds.noise)  # (N, K) of the unrounded logits
        margins = margins - rounding - rounding.gather(1, predictions.view(-1, 1))
    return margins.amin(1), lower - rounding, upper + rounding


def _relative_error(op: IntLinear | IntConv2d, in_scale: float, out_scale: float) -> float:
    """max over channels of |multiplier / 2^shift / (in_scale * weight_scale / out_scale) - 1|."""
    real = in_scale * op.weight_scale.double() / out_scale
    actual = op.multiplier.double() * torch.pow(2.0, -op.shift.double())
    return float(((actual / real) - 1).abs().max())
