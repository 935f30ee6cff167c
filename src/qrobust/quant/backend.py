"""The fast int8 backend: an ``Int8Model``'s own integers on torch's oneDNN int8 kernels, plain tensors only.

Convolutions (ReLU fused) and hidden linear layers run on ``torch.ops.onednn.qconv2d_pointwise`` /
``qlinear_pointwise`` (the maintained int8 path that PT2E and Inductor lower to) with the reference
model's int8 weights, int32 biases, scales and zero points, no recalibration, on plain uint8/int8
tensors: no quantized tensor is created and ``torch.ao.quantization`` is not used. Activations stay
uint8 in channels-last layout. Requantization inside oneDNN uses float32 scales and round-half-even
instead of the reference's 31-bit fixed point and round-half-up, so an activation can differ by one
step where a value falls within about 2^-20 of a rounding boundary; predictions agree on all but a
small fraction of inputs (tests/quant/test_backend.py, bench/int8_backend.py).

Two torch 2.13 kernels are replaced, each pinned by a test that fails once torch fixes it:
``onednn::qadd`` reads uint8 inputs >= 128 as negative, so residual adds run as a 1x1 identity
convolution with a fused sum (the same float requantization); uint8 ``max_pool2d`` refuses
channels-last inputs with C*H*W > 255, so max pooling is an exact elementwise maximum of strided
views. Global average pooling (the reference's rounding division, on int32 pixel sums) and the int32
logits layer are exact integer ops, so the logits are exact integers in the reference's units; so
is the input quantizer (integer lattice values -> uint8 codes).

Activations use the full uint8 range. That is exact on CPUs with VNNI (AVX512-VNNI or AVX-VNNI);
plain AVX2 int8 kernels can saturate 16-bit intermediate sums instead, which is why
``fast_backend`` warns when /proc/cpuinfo shows no VNNI.
"""

from __future__ import annotations

import abc
import copy
import functools
import warnings
from pathlib import Path
from typing import Any, Protocol, cast, runtime_checkable

import torch
from torch import nn

from qrobust.quant.engine import (
    Int8Model,
    IntAdd,
    IntConv2d,
    IntFlatten,
    IntGlobalAvgPool,
    IntLinear,
    IntMaxPool2d,
    check_images,
    run_program,
)
from qrobust.quant.numerics import UINT8_MAX, lattice_codes, pad_channels


@runtime_checkable
class Int8Backend(Protocol):
    """Anything that classifies integer lattice values (uint8 images, or int16 x + noise) with an int8 model:
    the reference ``Int8Model`` or a fast backend.
    Shapes: images (N, C, H, W) integer -> logits (N, K) int32, labels (N,) int64."""

    def logits(self, images: torch.Tensor) -> torch.Tensor: ...

    def predict(self, images: torch.Tensor) -> torch.Tensor: ...


def _has_vnni() -> bool | None:
    """Whether the CPU has VNNI int8 dot products; None where /proc/cpuinfo cannot tell."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return any(flag in flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


class _Prepacked(nn.Module, abc.ABC):
    """A module whose int8 ``weight`` buffer runs as ``packed``, oneDNN's prepacked copy of it.

    Prepacked tensors are opaque: they cannot be copied or pickled, so copies and pickles leave
    ``packed`` out and pack the weight again.
    """

    weight: torch.Tensor

    @abc.abstractmethod
    def _pack(self) -> torch.Tensor:
        """oneDNN's prepacked copy of ``weight``."""

    def __getstate__(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if key != "packed"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.packed = self._pack()


class _Affine(_Prepacked):
    """A conv or hidden linear layer on oneDNN: uint8 in, uint8 out, ReLU fused; weights prepacked once.

    oneDNN pads with the input zero point (real 0.0); a first conv whose padding is another value
    (the model's Normalize folded in) is padded explicitly first. Shapes: (N, C, H, W) uint8 ->
    (N, O, OH, OW) uint8 channels-last, or (N, I) -> (N, O).
    """

    def __init__(self, op: IntConv2d | IntLinear, in_scale: float, out_qparams: tuple[float, int]):
        super().__init__()
        self.conv = isinstance(op, IntConv2d)
        self.in_scale, self.in_zero_point = in_scale, op.in_zero_point
        self.out_scale, self.out_zero_point = out_qparams
        self.attr = "relu" if op.relu else "none"
        self.register_buffer("weight_scale", op.weight_scale.float())
        self.register_buffer("weight_zero_point", torch.zeros(op.weight.shape[0], dtype=torch.int64))
        # the int32 bias in real units; oneDNN adds it to the float32 accumulator before requantizing
        self.register_buffer("bias", (op.bias.double() * in_scale * op.weight_scale).float())
        self.pad: tuple[tuple[int, int], torch.Tensor] | None = None
        if isinstance(op, IntConv2d):
            self.stride, padding = list(op.stride), op.padding
            if any(padding) and not bool(torch.all(op.pad_value == op.in_zero_point)):
                self.pad, padding = (padding, op.pad_value), (0, 0)
            self.padding = list(padding)
        self.register_buffer("weight", op.weight.clone())
        self.packed = self._pack()

    def _pack(self) -> torch.Tensor:
        if not self.conv:
            return torch.ops.onednn.qlinear_prepack(self.weight, None)
        return torch.ops.onednn.qconv_prepack(
            self.weight,
            self.weight_scale,
            self.in_scale,
            self.in_zero_point,
            self.stride,
            self.padding,
            [1, 1],
            1,
            None,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.conv:
            return torch.ops.onednn.qlinear_pointwise(
                x.contiguous(),
                self.in_scale,
                self.in_zero_point,
                self.packed,
                self.weight_scale,
                self.weight_zero_point,
                self.bias,
                self.out_scale,
                self.out_zero_point,
                None,
                self.attr,
                [],
                "",
            )
        if self.pad is not None:
            x = pad_channels(x, *self.pad)
        return torch.ops.onednn.qconv2d_pointwise(
            x.contiguous(memory_format=torch.channels_last),
            self.in_scale,
            self.in_zero_point,
            self.packed,
            self.weight_scale,
            self.weight_zero_point,
            self.bias,
            self.stride,
            self.padding,
            [1, 1],
            1,
            self.out_scale,
            self.out_zero_point,
            None,
            self.attr,
            [],
            "",
        )


class _Add(_Prepacked):
    """Residual add (ReLU fused) as oneDNN's 1x1 identity convolution of ``a`` with a fused sum of ``b``.

    The kernel computes round(((a - zp_a) s_a + (b - zp_b) s_b) / s_out) + zp_out in float32, like
    the convolutions' requantization. It replaces torch 2.13's ``onednn::qadd``, whose vectorized
    loop reads uint8 inputs >= 128 as negative int8 (pinned in tests/quant/test_backend.py).
    ``consume_b``: the sum is written over ``b`` (no copy), for a ``b`` that no later op reads.
    Shapes: two (N, C, H, W) uint8 -> (N, C, H, W) uint8 channels-last.
    """

    def __init__(
        self,
        op: IntAdd,
        channels: int,
        in_qparams: list[tuple[float, int]],
        out_qparams: tuple[float, int],
        consume_b: bool,
    ):
        super().__init__()
        (self.scale_a, self.zero_a), (self.scale_b, self.zero_b) = in_qparams
        self.out_scale, self.out_zero_point = out_qparams
        self.relu = "relu" if op.relu else "none"
        self.consume_b = consume_b
        self.register_buffer("weight", torch.eye(channels, dtype=torch.int8).view(channels, channels, 1, 1))
        self.register_buffer("weight_scale", torch.ones(channels))
        self.register_buffer("weight_zero_point", torch.zeros(channels, dtype=torch.int64))
        self.packed = self._pack()

    def _pack(self) -> torch.Tensor:
        return torch.ops.onednn.qconv_prepack(
            self.weight, self.weight_scale, self.scale_a, self.zero_a, [1, 1], [0, 0], [1, 1], 1, None
        )

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        b = b.contiguous(memory_format=torch.channels_last)
        return torch.ops.onednn.qconv2d_pointwise.binary(
            a.contiguous(memory_format=torch.channels_last),
            self.scale_a,
            self.zero_a,
            self.packed,
            self.weight_scale,
            self.weight_zero_point,
            b if self.consume_b else b.clone(memory_format=torch.channels_last),
            None,
            [1, 1],
            [0, 0],
            [1, 1],
            1,
            self.out_scale,
            self.out_zero_point,
            None,
            self.scale_b,
            self.zero_b,
            "sum",
            1.0,
            self.relu,
            [],
            "",
        )


class _MaxPool(nn.Module):
    """Max pooling as elementwise maxima of strided views, first along W, then along H; exact on uint8.

    It exists because torch 2.13's ``max_pool2d`` refuses channels-last uint8 inputs with
    C*H*W > 255 (pinned in tests/quant/test_backend.py), and converting the layout would cost more
    than the pooling. Padding uses 0, as in ``IntMaxPool2d``. Shapes: (N, C, H, W) -> (N, C, OH, OW).
    """

    def __init__(self, op: IntMaxPool2d):
        super().__init__()
        self.kernel_size, self.stride, self.padding = op.kernel_size, op.stride, op.padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.padding):
            x = pad_channels(x, self.padding, torch.zeros(x.shape[1], dtype=torch.uint8))
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        out_h, out_w = (x.shape[2] - kh) // sh + 1, (x.shape[3] - kw) // sw + 1
        x = functools.reduce(
            torch.maximum, [x[..., j : j + sw * (out_w - 1) + 1 : sw] for j in range(kw)]
        )  # (N, C, H, OW)
        return functools.reduce(torch.maximum, [x[:, :, i : i + sh * (out_h - 1) + 1 : sh] for i in range(kh)])


class _GlobalAvgPool(nn.Module):
    """``IntGlobalAvgPool``'s integer rounding division, with the pixel sums taken in int32 (exact below 2^23
    pixels), which reads channels-last uint8 several times faster than the reference's int64 sums.

    Shapes: (N, C, H, W) uint8 -> (N, C, 1, 1) uint8.
    """

    def __init__(self, op: IntGlobalAvgPool):
        super().__init__()
        self.in_zero_point, self.out_zero_point = op.in_zero_point, op.out_zero_point
        self.multiplier, self.shift = op.multiplier, op.shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        count = x.shape[2] * x.shape[3]
        if count >= 2**23 or count.bit_length() + self.shift > 62:
            raise ValueError(f"average pooling over {count} pixels would overflow with shift {self.shift}")
        total = x.sum((2, 3), keepdim=True, dtype=torch.int32).to(torch.int64) - count * self.in_zero_point
        divisor = count << self.shift
        q = torch.div(total * self.multiplier + divisor // 2, divisor, rounding_mode="floor") + self.out_zero_point
        return torch.clamp(q, 0, UINT8_MAX).to(torch.uint8)


class _FlattenChannelsLast(nn.Module):
    """(N, C, H, W) -> (N, H*W*C): channels-last memory read as it lies, without the copy that ``IntFlatten``'s
    channel-major order would take; the linear layers reading it get their weight columns in that order
    (``_hwc_columns``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1).flatten(1)


def _hwc_columns(op: IntLinear, channels: int) -> IntLinear:
    """A copy of ``op`` whose weight columns, (C, H, W)-ordered, are put in (H, W, C) order."""
    op = copy.deepcopy(op)
    out_features, in_features = op.weight.shape
    op.weight = op.weight.view(out_features, channels, in_features // channels).transpose(1, 2).flatten(1)
    return op


class QuantizedBackend(nn.Module):
    """An ``Int8Model``'s program on oneDNN's int8 kernels (plain uint8/int8 tensors); implements ``Int8Backend``.

    Build it with ``fast_backend``. Shapes: (N, C, H, W) integer -> (N, num_classes) int32.
    """

    def __init__(self, model: Int8Model) -> None:
        super().__init__()
        self.inputs = model.inputs
        self.input_step, self.input_zero_point = model.input_step, model.input_zero_point
        qparams = model.value_qparams
        readers: dict[int, list[int]] = {}
        for step, args in enumerate(model.inputs):
            for value in args:
                readers.setdefault(value, []).append(step)
        channels: list[int | None] = [None]  # of every value; the input's are not known before it runs
        fresh = [False]  # whether a value is a new tensor (not the caller's input, nor a view of another value)
        flat_hwc: dict[int, int] = {}  # flattened values in (H, W, C) order -> their channel count C
        steps: list[nn.Module] = []
        for index, (op, args) in enumerate(zip(model.ops, model.inputs)):
            if isinstance(op, IntLinear) and args[0] in flat_hwc:
                op = _hwc_columns(op, flat_hwc[args[0]])
            if isinstance(op, IntConv2d) or (isinstance(op, IntLinear) and not op.logits):
                steps.append(_Affine(op, qparams[args[0]][0], qparams[index + 1]))
            elif isinstance(op, IntAdd):
                if channels[args[0]] is None:
                    raise ValueError(f"op {index} adds the raw input; the fast backend needs a computed value there")
                # b may be overwritten if this add is its last reader and it is a fresh tensor of its own
                consume_b = args[1] != args[0] and readers[args[1]][-1] == index and fresh[args[1]]
                in_qparams = [qparams[i] for i in args]
                steps.append(_Add(op, cast(int, channels[args[0]]), in_qparams, qparams[index + 1], consume_b))
            elif isinstance(op, IntMaxPool2d):
                steps.append(_MaxPool(op))
            elif isinstance(op, IntGlobalAvgPool):
                steps.append(_GlobalAvgPool(op))
            elif isinstance(op, IntFlatten) and channels[args[0]] is not None and readers.get(index + 1):
                if all(isinstance(model.ops[reader], IntLinear) for reader in readers[index + 1]):
                    flat_hwc[index + 1] = cast(int, channels[args[0]])
                steps.append(_FlattenChannelsLast() if index + 1 in flat_hwc else op)
            else:  # the int32 logits layer: the exact reference op
                steps.append(op)
            fresh.append(isinstance(steps[-1], (_Affine, _Add)))
            if isinstance(op, (IntConv2d, IntLinear)):
                channels.append(int(op.weight.shape[0]))
            else:
                channels.append(None if isinstance(op, IntFlatten) else channels[args[0]])
        self.steps = nn.ModuleList(steps)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        codes = lattice_codes(images, self.input_step, self.input_zero_point)  # (N, C, H, W) uint8
        return run_program(self.steps, self.inputs, codes)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """int32 logits (N, num_classes), in the reference model's units, of integer lattice values (N, C, H, W)."""
        return self(images)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Top-1 labels (N,) int64 of integer lattice values (N, C, H, W); ties go to the lowest class index."""
        return self(images).argmax(1)


def fast_backend(model: Int8Model) -> QuantizedBackend:
    """Run ``model``'s int8 parameters on oneDNN's int8 CPU kernels, several times faster.

    Args:
        model: an ``Int8Model`` from ``convert`` or ``load_int8``; its parameters are used as they are.

    Predictions agree with ``model`` on all but rare inputs (rounding, see the module docstring).
    """
    if not isinstance(model, Int8Model):
        raise ValueError(f"fast_backend takes an Int8Model, got {type(model).__name__}")
    if not torch.backends.mkldnn.is_available():
        raise RuntimeError("fast_backend needs torch built with oneDNN (mkldnn); use the Int8Model itself")
    if _has_vnni() is False:
        warnings.warn(
            "this CPU has no VNNI: int8 kernels may saturate with full-range uint8 activations, "
            "so the fast backend can disagree with the reference engine more often",
            RuntimeWarning,
            stacklevel=2,
        )
    return QuantizedBackend(model)
