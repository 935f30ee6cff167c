"""Fake-quantized training modules, post-training calibration, and conversion to the integer engine.

Quantization-aware training after Jacob et al., "Quantization and Training of Neural Networks for
Efficient Integer-Arithmetic-Only Inference" (CVPR 2018, section 3): the float forward pass rounds
weights (per-channel symmetric int8) and activations (asymmetric uint8, ranges from exponential
moving averages of batch min/max) exactly where the integer engine will, BatchNorm is folded into the
conv before its weights are rounded, and gradients pass straight through the rounding. The input
quantizer maps the float input x = v / 255 (v a lattice value, noise allowed, unclipped) to the uint8
codes the int8 model will compute from v: clipped to [0, 1] and rounded to k/255 by default, or, with
``QuantConfig(input_margin=M)``, clipped to [-M, 255 + M] / 255 and rounded to an odd integer step
(``numerics.input_grid``), so noisy inputs are treated in training as deployment treats them.

Evaluation pitfall: rounding has zero gradient almost everywhere, so gradient attacks on a QAT or int8
model see only the straight-through surrogate; attack the float model or use gradient-free attacks.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from qrobust.graph import fold_batchnorm, fold_normalize
from qrobust.quant.engine import (
    INT32_MAX,
    LATTICE_DTYPES,
    Int8Model,
    IntAdd,
    IntConv2d,
    IntFlatten,
    IntGlobalAvgPool,
    IntLinear,
    IntMaxPool2d,
    IntOp,
    run_program,
)
from qrobust.quant.mixed import MixedPrecisionModel, calibrate_mixed
from qrobust.quant.numerics import (
    INT8_MAX,
    UINT8_MAX,
    activation_qparams,
    fake_quantize,
    fake_quantize_affine,
    input_grid,
    pad_channels,
    quantize_multiplier,
    quantize_multipliers,
    quantize_weight,
    round_half_up,
)

QParams = tuple[float, int]  # (scale, zero_point) of a value in the integer program


@dataclass(frozen=True)
class QuantConfig:
    """How ``prepare_qat`` quantizes: int8 weights per channel, uint8 activations per tensor.

    Args:
        ema_decay: smoothing of the activation ranges' moving averages during training, in [0, 1)
            (default 0.99; Jacob et al. use a value close to 1). Calibration uses plain min/max.
        input_margin: lattice units the input range extends below 0 and above 255 (default 0: inputs
            are clipped to the pixel range [0, 255]). Smoothing noise at large sigma pushes x + n far
            outside [0, 255]; a margin of about 2 sigma_int (255 at sigma = 0.5) lets the model read it
            unclipped, at the price of an odd input step > 1 (3 for margins up to 255, 5 up to 510).
    """

    ema_decay: float = 0.99
    input_margin: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.ema_decay, (int, float)) and 0.0 <= self.ema_decay < 1.0):
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        input_grid(self.input_margin)  # validates the margin


class InputQuant(nn.Module):
    """The int8 model's input quantizer, made differentiable: x = v / 255 is clipped to
    [-margin, 255 + margin] / 255 and rounded to multiples of step / 255 (``numerics.input_grid``),
    with straight-through gradients inside the range. Margin 0: clip to [0, 1], round to k/255.
    """

    def __init__(self, margin: int = 0) -> None:
        super().__init__()
        self.margin = margin
        self.step, self.zero_point = input_grid(margin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize(x, *self.qparams())

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(self.code_qparams()[0]), torch.tensor(float(self.zero_point))

    def code_qparams(self) -> QParams:
        """(scale, zero_point) of the uint8 codes, in double precision, as the integer program records them."""
        return self.step / UINT8_MAX, self.zero_point

    def grid_index(self, x: torch.Tensor) -> torch.Tensor:
        """round_half_up(255 x / step), as float: the input grid point nearest x (its code minus the zero point)."""
        return round_half_up(UINT8_MAX * x / self.step)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, step={self.step}, zero_point={self.zero_point}"


class ActQuant(nn.Module):
    """uint8 fake quantization of an activation with an observed range.

    Training updates the range by an exponential moving average of batch min/max (the first batch
    sets it); ``calibrate`` replaces it by the plain min/max over its batches; evaluation only reads it.
    """

    min_val: torch.Tensor
    max_val: torch.Tensor

    def __init__(self, ema_decay: float) -> None:
        super().__init__()
        self.ema_decay = ema_decay
        self.calibrating = False
        self.register_buffer("min_val", torch.tensor(math.inf))
        self.register_buffer("max_val", torch.tensor(-math.inf))

    @property
    def observed(self) -> bool:
        return bool(self.min_val <= self.max_val)

    def reset(self) -> None:
        self.min_val.fill_(math.inf)
        self.max_val.fill_(-math.inf)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating or self.training:
            self._observe(x.detach())
        return fake_quantize(x, *self.qparams())

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        low, high = x.min().float(), x.max().float()
        if self.calibrating or not self.observed:
            self.min_val.copy_(torch.minimum(self.min_val, low))
            self.max_val.copy_(torch.maximum(self.max_val, high))
        else:
            self.min_val.lerp_(low, 1.0 - self.ema_decay)
            self.max_val.lerp_(high, 1.0 - self.ema_decay)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point) as float32 0-dim tensors. Raises RuntimeError before any observation."""
        if not self.observed:
            raise RuntimeError("an activation range was never observed: calibrate or train the QAT model first")
        return activation_qparams(self.min_val, self.max_val)

    def extra_repr(self) -> str:
        return f"ema_decay={self.ema_decay}, range=[{self.min_val.item():.4g}, {self.max_val.item():.4g}]"


def _qparams(quant: InputQuant | ActQuant) -> QParams:
    scale, zero_point = quant.qparams()
    return float(scale), int(zero_point)


class _QAffine(nn.Module, abc.ABC):
    """Shared by QConv2d and QLinear: folding, fake quantization of the folded weight and bias, conversion.

    ``input_quant`` is the quantizer of the value this layer reads (shared with the layer that makes
    it): its scale sets the bias grid. ``normalize`` = (mean, std) of a Normalize layer folded into
    this one: W' = W / std_c and b' = b - sum W mean_c / std_c, so the layer reads the raw [0, 1]
    image. ``out_quant`` is None only for the model's last layer, whose outputs become int32 logits.
    """

    input_mean: torch.Tensor | None  # buffers with a Normalize folded in, else None
    input_std: torch.Tensor | None

    def __init__(
        self,
        relu: bool,
        normalize: tuple[torch.Tensor, torch.Tensor] | None,
        input_quant: InputQuant | ActQuant,
        out_quant: ActQuant | None,
    ):
        super().__init__()
        self.relu = relu
        self.input_quant = input_quant
        self.out_quant = out_quant
        if normalize is not None:
            mean, std = normalize
            self.register_buffer("input_mean", mean.detach().clone())
            self.register_buffer("input_std", std.detach().clone())
        else:
            self.input_mean = self.input_std = None

    def _normalize_folded(self, layer: nn.Conv2d | nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
        """(W', b') of ``layer`` with the Normalize folded in (or its own weight and bias)."""
        weight = layer.weight
        bias = layer.bias if layer.bias is not None else weight.new_zeros(weight.shape[0])
        if self.input_mean is None or self.input_std is None:  # both or neither
            return weight, bias
        return fold_normalize(weight, bias, self.input_mean, self.input_std)

    @abc.abstractmethod
    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The real weight and bias the integer layer implements (all folding done, before rounding)."""

    def _fake_quantized(
        self, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return fake_quantize_affine(weight, bias, self.input_quant.qparams()[0])

    def _finish(self, y: torch.Tensor) -> torch.Tensor:
        if self.relu:
            y = F.relu(y)
        return self.out_quant(y) if self.out_quant is not None else y

    def to_integer(self, in_qparams: Sequence[QParams]) -> tuple[IntOp, QParams]:
        """The integer op for this layer reading a value with ``in_qparams``, and its output qparams."""
        ((in_scale, in_zero_point),) = in_qparams
        weight, bias = (t.detach() for t in self.folded())
        q_weight, weight_scale = quantize_weight(weight)
        weight_scale = weight_scale.double()
        acc_scale = in_scale * weight_scale  # (O,) real value of one accumulator unit
        q_bias = round_half_up(bias.double() / acc_scale)
        if self.out_quant is not None:
            out_scale, out_zero_point = _qparams(self.out_quant)
        else:  # logits: the coarsest accumulator unit, so every multiplier is <= 1 and nothing saturates
            out_scale, out_zero_point = float(acc_scale.max()), 0
        bound = q_weight[0].numel() * UINT8_MAX * INT8_MAX + float(q_bias.abs().max())
        if bound > INT32_MAX:
            raise ValueError(
                f"{type(self).__name__} with {q_weight[0].numel()} inputs per output could overflow its int32 "
                f"accumulator (bound {bound:.3g} > 2^31 - 1)"
            )
        op = self._integer_op(
            tuple(q_weight.shape),
            in_zero_point=in_zero_point,
            out_zero_point=out_zero_point,
            relu=self.relu,
            logits=self.out_quant is None,
        )
        multiplier, shift = quantize_multipliers(acc_scale / out_scale)
        op.weight.copy_(q_weight.to(torch.int8))
        op.bias.copy_(q_bias.to(torch.int32))
        op.multiplier.copy_(multiplier)
        op.shift.copy_(shift)
        op.weight_scale.copy_(weight_scale)
        return op, (out_scale, out_zero_point)

    @abc.abstractmethod
    def _integer_op(self, weight_shape: tuple[int, ...], **affine: Any) -> IntConv2d | IntLinear:
        """The empty integer op (conv or linear) this layer converts to."""


class QConv2d(_QAffine):
    """Conv2d with optional folded BatchNorm, ReLU and Normalize; fake-quantized weights and output.

    BatchNorm folding follows Jacob et al. (section 3.2) as implemented by torch.ao's ConvBn2d: the
    weight is scaled by gamma / sqrt(running_var + eps) and rounded; in training the conv output is
    unscaled again and normalised with batch statistics (which also updates the running ones), in
    evaluation the folded bias is added, which is exactly what the integer conv computes.
    With Normalize folded in, the raw image is padded with the input grid value nearest mean_c per
    channel: zero padding in normalised space is mean padding in raw space, up to step/2 / 255 of
    rounding at the border (0.5/255 without an input margin).

    Shapes: (N, C, H, W) -> (N, O, OH, OW).
    """

    pad_value: torch.Tensor  # a buffer with a Normalize folded in

    def __init__(
        self,
        conv: nn.Conv2d,
        bn: nn.BatchNorm2d | None,
        relu: bool,
        normalize: tuple[torch.Tensor, torch.Tensor] | None,
        input_quant: InputQuant | ActQuant,
        out_quant: ActQuant | None,
    ) -> None:
        super().__init__(relu, normalize, input_quant, out_quant)
        self.conv = conv
        self.bn = bn
        if self.input_mean is not None:  # prepare_qat folds only a Normalize of the model input, read by InputQuant
            grid = cast(InputQuant, input_quant).grid_index(self.input_mean)
            self.register_buffer("pad_value", grid * cast(InputQuant, input_quant).step / UINT8_MAX)

    @staticmethod
    def _bn_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
        return bn.weight / torch.sqrt(
            cast(torch.Tensor, bn.running_var) + bn.eps
        )  # (O,); check_supported refuses a BatchNorm without running statistics

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        weight, bias = self._normalize_folded(self.conv)
        return (weight, bias) if self.bn is None else fold_batchnorm(weight, bias, self.bn)

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        padding = cast(tuple[int, int], self.conv.padding)  # check_supported refuses a str
        conv_padding: tuple[int, int] | int = padding
        if self.input_mean is not None and any(padding):
            x = pad_channels(x, padding, self.pad_value)  # (N, C, H + 2ph, W + 2pw)
            conv_padding = 0
        return F.conv2d(x, *self._fake_quantized(weight, bias), self.conv.stride, conv_padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn is not None and self.training:
            weight, bias = self._normalize_folded(self.conv)
            scale = self._bn_scale(self.bn).view(-1, 1, 1)
            y = self._conv(x, weight * scale.unsqueeze(1), None) / scale + bias.view(-1, 1, 1)
            return self._finish(self.bn(y))  # batch statistics
        return self._finish(self._conv(x, *self.folded()))

    def _integer_op(self, weight_shape: tuple[int, ...], **affine: Any) -> IntConv2d | IntLinear:
        padding = cast(tuple[int, int], self.conv.padding)  # check_supported refuses string padding
        op = IntConv2d(weight_shape, self.conv.stride, padding, **affine)
        if self.input_mean is not None:
            input_quant = cast(InputQuant, self.input_quant)  # only the model input's Normalize is folded
            code = input_quant.grid_index(self.input_mean) + input_quant.zero_point
            op.pad_value.copy_(code.to(torch.uint8))
        return op


class QLinear(_QAffine):
    """Linear with optional ReLU and folded Normalize (per input feature); fake-quantized weight and output.

    Shapes: (N, I) -> (N, O).
    """

    def __init__(
        self,
        linear: nn.Linear,
        relu: bool,
        normalize: tuple[torch.Tensor, torch.Tensor] | None,
        input_quant: InputQuant | ActQuant,
        out_quant: ActQuant | None,
    ) -> None:
        super().__init__(relu, normalize, input_quant, out_quant)
        self.linear = linear

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._normalize_folded(self.linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._finish(F.linear(x, *self._fake_quantized(*self.folded())))

    def _integer_op(self, weight_shape: tuple[int, ...], **affine: Any) -> IntConv2d | IntLinear:
        return IntLinear(weight_shape, **affine)


class QAdd(nn.Module):
    """Residual add with optional ReLU and a fake-quantized output. Shapes: two (N, C, H, W) -> (N, C, H, W)."""

    def __init__(self, relu: bool, out_quant: ActQuant) -> None:
        super().__init__()
        self.relu = relu
        self.out_quant = out_quant

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        y = a + b
        return self.out_quant(F.relu(y) if self.relu else y)

    def to_integer(self, in_qparams: Sequence[QParams]) -> tuple[IntOp, QParams]:
        (scale_a, zero_a), (scale_b, zero_b) = in_qparams
        out_scale, out_zero_point = _qparams(self.out_quant)
        reals = (scale_a / out_scale, scale_b / out_scale)
        _, shift = quantize_multiplier(max(reals))  # one shift for both, set by the larger multiplier
        op = IntAdd((zero_a, zero_b), out_zero_point, shift, self.relu)
        op.multipliers.copy_(torch.tensor([math.floor(r * 2**shift + 0.5) for r in reals], dtype=torch.int32))
        op.scales.copy_(torch.tensor([scale_a, scale_b], dtype=torch.float64))
        return op, (out_scale, out_zero_point)


class QMaxPool2d(nn.MaxPool2d):
    """Max pooling; the grid is preserved, so nothing is rounded. Shapes: (N, C, H, W) -> (N, C, OH, OW)."""

    def to_integer(self, in_qparams: Sequence[QParams]) -> tuple[IntOp, QParams]:
        return IntMaxPool2d(_pair(self.kernel_size), _pair(self.stride), _pair(self.padding)), in_qparams[0]


class QGlobalAvgPool(nn.Module):
    """Global average pooling with a fake-quantized output of its own range, which is much narrower
    than its input's (averaging cancels spatial variation), so the pooled features keep their detail.

    Shapes: (N, C, H, W) -> (N, C, 1, 1).
    """

    def __init__(self, out_quant: ActQuant) -> None:
        super().__init__()
        self.out_quant = out_quant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_quant(x.mean((2, 3), keepdim=True))

    def to_integer(self, in_qparams: Sequence[QParams]) -> tuple[IntOp, QParams]:
        ((in_scale, in_zero_point),) = in_qparams
        out_scale, out_zero_point = _qparams(self.out_quant)
        multiplier, shift = quantize_multiplier(in_scale / out_scale)
        return IntGlobalAvgPool(in_zero_point, out_zero_point, multiplier, shift), (out_scale, out_zero_point)


class QFlatten(nn.Flatten):
    """(N, C, H, W) -> (N, C*H*W); nothing to quantize."""

    def to_integer(self, in_qparams: Sequence[QParams]) -> tuple[IntOp, QParams]:
        return IntFlatten(), in_qparams[0]


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (value[0], value[1])


QStep = _QAffine | QAdd | QMaxPool2d | QGlobalAvgPool | QFlatten
"""What ``prepare_qat`` puts in ``QATModel.steps``: each converts itself with ``to_integer``."""


class QATModel(nn.Module):
    """A fake-quantized model from ``prepare_qat``: floats v / 255 in (v a lattice value, or any float:
    noise allowed, unclipped; the input quantizer clips and rounds), float logits out.

    It is a plain nn.Module, so ``qrobust.train.train`` trains it unchanged; ``calibrate`` sets its
    ranges after training or instead of it, and ``convert`` turns it into an ``Int8Model``.
    ``steps[i]`` reads the values ``inputs[i]`` (value 0 is the input on the input quantizer's grid).

    Shapes: (N, C, H, W) -> (N, num_classes).
    """

    def __init__(self, input_quant: InputQuant, steps: Sequence[nn.Module], inputs: Sequence[tuple[int, ...]]) -> None:
        super().__init__()
        self.input_quant = input_quant
        self.steps = nn.ModuleList(steps)
        self.inputs = tuple(inputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_program(self.steps, self.inputs, self.input_quant(x))


def calibrate(
    model: QATModel | MixedPrecisionModel, images: torch.Tensor, *, batch_size: int = 256
) -> QATModel | MixedPrecisionModel:
    """Post-training quantization: set every activation range to the min/max seen on ``images``.

    Runs ``model`` in evaluation mode (BatchNorm uses its running statistics) on ``images``: integer
    (N, C, H, W) lattice values (uint8 images, or noisy int16 x + n, unclipped; divided by 255), or
    floats (e.g. noisy [0, 1] images); the input quantizer clips and rounds. A few hundred images
    usually suffice. Returns ``model``, calibrated in place. A mixed-precision model (from
    ``prepare_qat(model, policy)``) gets KL-calibrated clips instead (``qrobust.quant.mixed.calibrate_mixed``).
    """
    if isinstance(model, MixedPrecisionModel):
        return calibrate_mixed(model, images, batch_size=batch_size)
    if not isinstance(model, QATModel):
        raise ValueError(f"calibrate takes a model made by prepare_qat, got {type(model).__name__}")
    if images.dim() != 4 or not (images.dtype in LATTICE_DTYPES or images.is_floating_point()):
        raise ValueError(
            f"images must be integer lattice values or float of shape (N, C, H, W), got {images.dtype} of shape "
            f"{tuple(images.shape)}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    quants = [m for m in model.modules() if isinstance(m, ActQuant)]
    was_training = model.training
    model.eval()
    for quant in quants:
        quant.reset()
        quant.calibrating = True
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                batch = images[start : start + batch_size]
                model(batch if batch.is_floating_point() else batch.float() / UINT8_MAX)
    finally:
        for quant in quants:
            quant.calibrating = False
        model.train(was_training)
    return model


def convert(model: QATModel) -> Int8Model:
    """The integer-only ``Int8Model`` that computes what ``model`` simulates (in evaluation mode).

    Weights become int8 with per-channel scales, biases int32, every rescaling a fixed-point multiplier;
    BatchNorm uses its running statistics; the input quantizer's margin carries over. Raises
    RuntimeError if ``model`` was neither trained nor calibrated (its activation ranges are unknown).
    """
    if not isinstance(model, QATModel):
        raise ValueError(f"convert takes a model made by prepare_qat, got {type(model).__name__}")
    qparams: list[QParams] = [model.input_quant.code_qparams()]
    ops: list[IntOp] = []
    with torch.no_grad():
        for step, args in zip(model.steps, model.inputs):
            op, out_qparams = cast(QStep, step).to_integer([qparams[i] for i in args])
            ops.append(op)
            qparams.append(out_qparams)
    return Int8Model(ops, model.inputs, qparams, input_margin=model.input_quant.margin)
