"""The integer-only reference engine: the ground truth every faster int8 backend is checked against.

Every tensor an op computes on is an integer tensor (Jacob et al., "Quantization and Training of
Neural Networks for Efficient Integer-Arithmetic-Only Inference", CVPR 2018): uint8 activations,
int8 weights, int32 biases and accumulators, int64 only inside fixed-point rescaling (an int32
accumulator times an int32 multiplier, then one rounding right shift or division). Convolution is
integer im2col (a strided view of the zero-point-centred int32 input, copied once) followed by an
int32 matrix product, which torch supports exactly on CPU (no float BLAS involved). The engine
favours being obviously right over being fast.

An ``Int8Model`` is a straight-line program: ``ops[i]`` reads the values ``inputs[i]`` (value 0 is
the uint8 codes of the input) and writes value ``i + 1``; the last value is the int32 logits. Before
the program runs, the model's input quantizer maps integer lattice values (uint8 images, or unclipped
x + noise) to those codes, by an integer rounding division (``numerics.lattice_codes``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, cast

import torch
from torch import nn

from qrobust.quant.numerics import (
    UINT8_MAX,
    input_grid,
    lattice_codes,
    pad_channels,
    requantize,
    rounding_right_shift,
)

INT32_MAX = 2**31 - 1
LATTICE_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)  # what int8 models read


def run_program(ops: Iterable[nn.Module], inputs: Sequence[tuple[int, ...]], x: torch.Tensor) -> torch.Tensor:
    """Run a straight-line program (see the module docstring), dropping each value after its last use."""
    last_use = {index: step for step, args in enumerate(inputs) for index in args}
    values: list[torch.Tensor | None] = [x]
    for step, (op, args) in enumerate(zip(ops, inputs)):
        values.append(op(*(values[i] for i in args)))
        for index in set(args):
            if last_use[index] == step:
                values[index] = None
    return cast(torch.Tensor, values[-1])  # the output: no later op reads it, so it is never dropped


def _windows(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
    """All kernel windows of a contiguous (N, C, H, W) tensor as a strided view (N, C, OH, OW, kh, kw)."""
    n, c, h, w = x.shape
    sn, sc, sh, sw = x.stride()
    out_h = (h - kernel[0]) // stride[0] + 1
    out_w = (w - kernel[1]) // stride[1] + 1
    return x.as_strided((n, c, out_h, out_w, *kernel), (sn, sc, sh * stride[0], sw * stride[1], sh, sw))


class IntOp(nn.Module):
    """An op of the integer program. ``spec()`` is its JSON description; buffers hold its tensors."""

    kind: ClassVar[str]

    def spec(self) -> dict[str, Any]:
        return {}


class _IntAffine(IntOp):
    """int8 weights, int32 bias and per-channel fixed-point requantization to uint8 (or to int32 logits).

    ``weight_scale`` (float) is kept only to describe the model (saving, dequantizing, building a
    backend that needs real scales); the integer forward pass never reads it.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    multiplier: torch.Tensor
    shift: torch.Tensor
    weight_scale: torch.Tensor

    def __init__(self, weight_shape: Sequence[int], in_zero_point: int, out_zero_point: int, relu: bool, logits: bool):
        super().__init__()
        out_channels = weight_shape[0]
        self.register_buffer("weight", torch.zeros(weight_shape, dtype=torch.int8))
        self.register_buffer("bias", torch.zeros(out_channels, dtype=torch.int32))
        self.register_buffer("multiplier", torch.zeros(out_channels, dtype=torch.int32))
        self.register_buffer("shift", torch.ones(out_channels, dtype=torch.int32))
        self.register_buffer("weight_scale", torch.zeros(out_channels, dtype=torch.float64))
        self.in_zero_point = int(in_zero_point)
        self.out_zero_point = int(out_zero_point)
        self.relu = bool(relu)
        self.logits = bool(logits)

    def spec(self) -> dict[str, Any]:
        return {
            "weight_shape": list(self.weight.shape),
            "in_zero_point": self.in_zero_point,
            "out_zero_point": self.out_zero_point,
            "relu": self.relu,
            "logits": self.logits,
        }

    def _centered(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 input minus its zero point, as int32: the integer whose real value is x * in_scale."""
        return x.to(torch.int32) - self.in_zero_point

    def _accumulate(self, columns: torch.Tensor) -> torch.Tensor:
        """int32 columns @ weight^T + bias. Shapes: (..., K) int32 -> (..., O) int32."""
        return columns @ self.weight.flatten(1).to(torch.int32).t() + self.bias

    def _output(self, acc: torch.Tensor) -> torch.Tensor:
        """Requantize int32 accumulators to uint8 (clamped, ReLU = clamp at the zero point) or int32 logits."""
        q = requantize(acc, self.multiplier, self.shift) + self.out_zero_point  # int64
        if self.logits:  # unclamped: |acc * multiplier| < 2^31 since logit multipliers are <= 1
            return (torch.clamp(q, min=self.out_zero_point) if self.relu else q).to(torch.int32)
        return torch.clamp(q, self.out_zero_point if self.relu else 0, UINT8_MAX).to(torch.uint8)


class IntConv2d(_IntAffine):
    """Integer convolution: explicit per-channel padding, im2col by strided views, int32 matmul.

    ``pad_value`` is the uint8 each input channel is padded with: the input zero point (real 0.0)
    in general, and round(255 * mean_c) for a first conv with the model's Normalize folded in.
    Shapes: (N, C, H, W) uint8 -> (N, O, OH, OW) uint8.
    """

    kind = "conv"
    pad_value: torch.Tensor

    def __init__(self, weight_shape: Sequence[int], stride: Sequence[int], padding: Sequence[int], **affine: Any):
        super().__init__(weight_shape, **affine)
        self.stride = (int(stride[0]), int(stride[1]))
        self.padding = (int(padding[0]), int(padding[1]))
        self.register_buffer("pad_value", torch.full((weight_shape[1],), self.in_zero_point, dtype=torch.uint8))

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "stride": list(self.stride), "padding": list(self.padding)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._centered(x)  # (N, C, H, W) int32
        if any(self.padding):
            x = pad_channels(x, self.padding, self._centered(self.pad_value))
        windows = _windows(
            x.contiguous(), (self.weight.shape[2], self.weight.shape[3]), self.stride
        )  # (N, C, OH, OW, kh, kw)
        n, c, out_h, out_w, kh, kw = windows.shape
        columns = windows.permute(0, 2, 3, 1, 4, 5).reshape(n, out_h, out_w, c * kh * kw)  # im2col, one copy
        acc = self._accumulate(columns)  # (N, OH, OW, O) int32
        return self._output(acc).permute(0, 3, 1, 2).contiguous()  # (N, O, OH, OW)


class IntLinear(_IntAffine):
    """Integer fully connected layer. Shapes: (N, I) uint8 -> (N, O) uint8, or int32 logits."""

    kind = "linear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._output(self._accumulate(self._centered(x)))


class IntAdd(IntOp):
    """Residual add: both inputs rescaled to the output scale by fixed-point multipliers sharing one
    shift, summed and rounded once; optional ReLU as a clamp at the output zero point.

    out = zp + round((m_a (a - zp_a) + m_b (b - zp_b)) / 2^shift), with m / 2^shift = s_in / s_out.
    Shapes: two (N, C, H, W) uint8 -> (N, C, H, W) uint8.
    """

    kind = "add"
    multipliers: torch.Tensor
    scales: torch.Tensor

    def __init__(self, zero_points: Sequence[int], out_zero_point: int, shift: int, relu: bool):
        super().__init__()
        self.register_buffer("multipliers", torch.zeros(2, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(2, dtype=torch.float64))  # descriptive, as weight_scale
        self.zero_points = (int(zero_points[0]), int(zero_points[1]))
        self.out_zero_point = int(out_zero_point)
        self.shift = int(shift)
        self.relu = bool(relu)

    def spec(self) -> dict[str, Any]:
        return {
            "zero_points": list(self.zero_points),
            "out_zero_point": self.out_zero_point,
            "shift": self.shift,
            "relu": self.relu,
        }

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        m_a, m_b = self.multipliers.to(torch.int64)
        total = m_a * (a.to(torch.int64) - self.zero_points[0]) + m_b * (b.to(torch.int64) - self.zero_points[1])
        q = rounding_right_shift(total, self.shift) + self.out_zero_point
        return torch.clamp(q, self.out_zero_point if self.relu else 0, UINT8_MAX).to(torch.uint8)


class IntMaxPool2d(IntOp):
    """Max pooling on uint8 (same scale and zero point in and out); padding uses 0, the smallest uint8.

    Shapes: (N, C, H, W) -> (N, C, OH, OW).
    """

    kind = "maxpool"

    def __init__(self, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int]):
        super().__init__()
        self.kernel_size = (int(kernel_size[0]), int(kernel_size[1]))
        self.stride = (int(stride[0]), int(stride[1]))
        self.padding = (int(padding[0]), int(padding[1]))

    def spec(self) -> dict[str, Any]:
        return {"kernel_size": list(self.kernel_size), "stride": list(self.stride), "padding": list(self.padding)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.padding):
            x = pad_channels(x, self.padding, torch.zeros(x.shape[1], dtype=torch.uint8))
        return _windows(x.contiguous(), self.kernel_size, self.stride).amax((4, 5))


class IntGlobalAvgPool(IntOp):
    """Global average pooling to its own scale: an integer sum over the n = H*W pixels, then one rounding
    division, out = zp_out + floor((m * sum(q - zp_in) + n 2^(shift-1)) / (n 2^shift)),
    with m / 2^shift = s_in / s_out. n is read from the input, so any feature map size works.

    Shapes: (N, C, H, W) uint8 -> (N, C, 1, 1) uint8.
    """

    kind = "avgpool"

    def __init__(self, in_zero_point: int, out_zero_point: int, multiplier: int, shift: int):
        super().__init__()
        self.in_zero_point = int(in_zero_point)
        self.out_zero_point = int(out_zero_point)
        self.multiplier = int(multiplier)
        self.shift = int(shift)

    def spec(self) -> dict[str, Any]:
        return {
            "in_zero_point": self.in_zero_point,
            "out_zero_point": self.out_zero_point,
            "multiplier": self.multiplier,
            "shift": self.shift,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        count = x.shape[2] * x.shape[3]
        if count.bit_length() + self.shift > 62:
            raise ValueError(f"average pooling over {count} pixels would overflow int64 with shift {self.shift}")
        total = (x.to(torch.int64) - self.in_zero_point).sum((2, 3), keepdim=True)  # (N, C, 1, 1)
        divisor = count << self.shift
        q = torch.div(total * self.multiplier + divisor // 2, divisor, rounding_mode="floor") + self.out_zero_point
        return torch.clamp(q, 0, UINT8_MAX).to(torch.uint8)


class IntFlatten(IntOp):
    """(N, C, H, W) -> (N, C*H*W), channel-major like ``nn.Flatten``."""

    kind = "flatten"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


OPS: dict[str, type[IntOp]] = {
    op.kind: op for op in (IntConv2d, IntLinear, IntAdd, IntMaxPool2d, IntGlobalAvgPool, IntFlatten)
}


class Int8Model(nn.Module):
    """An int8 classifier run by the integer reference engine: integer lattice values in, int32 logits out.

    Made by ``convert`` from a QAT model. It reads integer lattice values v directly: uint8 images, or
    x + noise unclipped (int16, int32). Its input quantizer maps them to uint8 codes
    clamp(round_half_up(v / step) + zero_point, 0, 255) with ``numerics.input_grid(input_margin)``;
    margin 0 (the default) is clamp(v, 0, 255), i.e. input scale 1/255, zero point 0. The model's
    Normalize is folded into its first layer. Logits are integers in units of ``logit_scale``; only
    their argmax matters to randomized smoothing. The whole map from v to the logits is a fixed
    integer function, so it is a valid base classifier for lattice certificates (docs/intrs-radius.md).

    Args:
        ops: the integer ops, in execution order.
        inputs: for each op, the indices of the values it reads (0 is the input codes).
        value_qparams: (scale, zero_point) of every value, the input codes' (step / 255, zero_point) first.
        input_margin: lattice units the input range extends beyond [0, 255] (``QuantConfig.input_margin``).

    Shapes: (N, C, H, W) integer -> (N, num_classes) int32.
    """

    def __init__(
        self,
        ops: Sequence[IntOp],
        inputs: Sequence[Sequence[int]],
        value_qparams: Sequence[tuple[float, int]],
        input_margin: int = 0,
    ):
        super().__init__()
        if len(ops) != len(inputs) or len(value_qparams) != len(ops) + 1:
            raise ValueError(
                f"a program needs one input list per op and one qparams pair per value, got {len(ops)} ops, "
                f"{len(inputs)} input lists and {len(value_qparams)} qparams pairs"
            )
        self.ops = nn.ModuleList(ops)
        self.inputs = tuple(tuple(int(i) for i in args) for args in inputs)
        self.value_qparams = tuple((float(scale), int(zero_point)) for scale, zero_point in value_qparams)
        self.input_margin = input_margin
        self.input_step, self.input_zero_point = input_grid(input_margin)
        if self.value_qparams[0] != (self.input_step / UINT8_MAX, self.input_zero_point):
            raise ValueError(
                f"input qparams {self.value_qparams[0]} do not match input margin {input_margin} "
                f"(step {self.input_step}, zero point {self.input_zero_point})"
            )
        for step, args in enumerate(self.inputs):
            if not args or not all(0 <= i <= step for i in args):
                raise ValueError(f"op {step} reads values {list(args)}; it may only read values 0..{step}")

    @property
    def logit_scale(self) -> float:
        """The real value of one unit of the int32 logits."""
        return self.value_qparams[-1][0]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return run_program(self.ops, self.inputs, self.input_codes(images))

    def input_codes(self, images: torch.Tensor) -> torch.Tensor:
        """The uint8 codes (N, C, H, W) the program reads, of integer lattice values (N, C, H, W)."""
        check_images(images)
        return lattice_codes(images, self.input_step, self.input_zero_point)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """int32 logits (N, num_classes) of integer lattice values (N, C, H, W)."""
        return self(images)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Top-1 labels (N,) int64 of integer lattice values (N, C, H, W); ties go to the lowest class index."""
        return self(images).argmax(1)

    def spec(self) -> dict[str, Any]:
        """The program's JSON description; with ``state_dict()`` it rebuilds the model (``from_spec``)."""
        return {
            "ops": [
                {"kind": op.kind, "inputs": list(args), **cast(IntOp, op).spec()}
                for op, args in zip(self.ops, self.inputs)
            ],
            "value_qparams": [list(pair) for pair in self.value_qparams],
            "input_margin": self.input_margin,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Int8Model:
        """An Int8Model with the structure ``spec`` describes and zero tensors; load a state_dict next.

        A spec without ``input_margin`` (written before the option existed) has margin 0.
        """
        ops, inputs = [], []
        for entry in spec["ops"]:
            options = dict(entry)
            kind, args = options.pop("kind"), options.pop("inputs")
            if kind not in OPS:
                raise ValueError(f"unknown integer op {kind!r}; known ops: {', '.join(OPS)}")
            ops.append(OPS[kind](**options))
            inputs.append(args)
        return cls(ops, inputs, [tuple(pair) for pair in spec["value_qparams"]], spec.get("input_margin", 0))


def check_images(images: torch.Tensor) -> None:
    """Raise ValueError unless ``images`` is an integer (N, C, H, W) batch of lattice values."""
    if images.dtype not in LATTICE_DTYPES or images.dim() != 4:
        raise ValueError(
            f"int8 models take integer lattice values of shape (N, C, H, W) (uint8 images, or int16 x + noise), got "
            f"{images.dtype} of shape {tuple(images.shape)}; map [0, 1] floats with (x * 255).round().to(torch.int16)"
        )
