"""A fast int8 backend: the parameters of an ``Int8Model`` run by torch's quantized CPU kernels.

This is the only module that touches ``torch.ao`` (eager static quantization, which PyTorch has
deprecated: it warns when quantized tensors are created; qrobust does not silence that). The backend
is built from the reference model's own int8 weights, int32 biases, scales and zero points, with no
recalibration: convs (with ReLU fused) and hidden linear layers run on FBGEMM/oneDNN via the ``x86``
engine, residual adds as ``add_relu``, max pooling natively. Global average pooling and the int32
logits layer, cheap as they are, reuse the reference integer ops, so the logits are exact integers in
the same units; so does the input quantizer (integer lattice values -> uint8 codes, integer ops only),
whose codes are then wrapped as quint8 with the model's input scale and zero point. Requantization
inside torch's kernels uses float32 multipliers and round-half-even instead of the reference's 31-bit
fixed point and round-half-up, so an activation can differ by one step where a value falls within
about 2^-20 of a rounding boundary; predictions agree on all but a small fraction of inputs (see
tests/quant/test_backend.py).

Activations use the full uint8 range (reduce_range=False). That is exact on CPUs with VNNI
(AVX512-VNNI or AVX-VNNI); FBGEMM's plain AVX2 kernels can saturate 16-bit intermediate sums
instead, which is why ``fast_backend`` warns when /proc/cpuinfo shows no VNNI.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
import torch.nn.functional as F
from torch import nn

from qrobust.quant.engine import (
    Int8Model,
    IntAdd,
    IntConv2d,
    IntFlatten,
    IntLinear,
    IntMaxPool2d,
    check_images,
    run_program,
)
from qrobust.quant.numerics import lattice_codes, pad_channels

ENGINES = ("x86", "fbgemm", "onednn")


@runtime_checkable
class Int8Backend(Protocol):
    """Anything that classifies integer lattice values (uint8 images, or int16 x + noise) with an int8 model:
    the reference ``Int8Model`` or a fast backend.
    Shapes: images (N, C, H, W) integer -> logits (N, K) int32, labels (N,) int64."""

    def logits(self, images: torch.Tensor) -> torch.Tensor: ...

    def predict(self, images: torch.Tensor) -> torch.Tensor: ...


@contextlib.contextmanager
def _quantized_engine(engine: str) -> Iterator[None]:
    """Use torch quantized ``engine`` inside the block and restore the previous one after it."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def _has_vnni() -> bool | None:
    """Whether the CPU has VNNI int8 dot products; None where /proc/cpuinfo cannot tell."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return any(flag in flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


class _Quantized(nn.Module):
    """A torch quantized module; plain uint8 inputs are first wrapped as quint8 with their known qparams.

    ``pad`` = (padding, per-channel uint8 values) pads such an input explicitly first (the first conv
    of a model with Normalize folded in, whose padding is not the zero point).
    """

    def __init__(
        self,
        module: nn.Module,
        in_qparams: Sequence[tuple[float, int]],
        pad: tuple[tuple[int, int], torch.Tensor] | None = None,
    ):
        super().__init__()
        self.module = module
        self.in_qparams = tuple(in_qparams)
        self.pad = pad

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return self.module(*(self._quantized(x, qparams) for x, qparams in zip(xs, self.in_qparams)))

    def _quantized(self, x: torch.Tensor, qparams: tuple[float, int]) -> torch.Tensor:
        if self.pad is not None:
            x = pad_channels(x.int_repr() if x.is_quantized else x, *self.pad)
        if not x.is_quantized:
            x = torch._make_per_tensor_quantized_tensor(x.contiguous(), *qparams)  # a view of the uint8s
        return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


class _Integer(nn.Module):
    """A reference integer op, run on the integer representation of quantized inputs."""

    def __init__(self, op: nn.Module):
        super().__init__()
        self.op = op

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return self.op(*(x.int_repr() if x.is_quantized else x for x in xs))


class _Add(nn.Module):
    """quantized add or add_relu to a given output scale and zero point."""

    def __init__(self, op: IntAdd, out_qparams: tuple[float, int]):
        super().__init__()
        self.functional = nnq.QFunctional()
        self.functional.scale, self.functional.zero_point = out_qparams
        self.relu = op.relu

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.functional.add_relu(a, b) if self.relu else self.functional.add(a, b)


class _MaxPool(nn.Module):
    def __init__(self, op: IntMaxPool2d):
        super().__init__()
        self.kernel_size, self.stride, self.padding = op.kernel_size, op.stride, op.padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding)


class _Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(x, 1)


def _weight_and_bias(op: IntConv2d | IntLinear, in_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's int8 weights as a per-channel qint8 tensor and its int32 bias as the float torch expects
    (torch re-quantizes it with scale in_scale * weight_scale, which recovers the same integers)."""
    weight = torch._make_per_channel_quantized_tensor(
        op.weight, op.weight_scale, torch.zeros_like(op.weight_scale, dtype=torch.int64), 0
    )
    bias = (op.bias.double() * (in_scale * op.weight_scale)).float()
    return weight, bias


def _affine_module(
    op: IntConv2d | IntLinear, in_scale: float, out_qparams: tuple[float, int], padding: tuple[int, int]
) -> nn.Module:
    """A torch quantized conv or linear (ReLU fused if the op has it) holding the op's integers."""
    out_channels, in_channels = op.weight.shape[:2]
    if isinstance(op, IntConv2d):
        kind = nniq.ConvReLU2d if op.relu else nnq.Conv2d
        module = kind(in_channels, out_channels, tuple(op.weight.shape[2:]), stride=op.stride, padding=padding)
    else:
        module = (nniq.LinearReLU if op.relu else nnq.Linear)(in_channels, out_channels)
    module.set_weight_bias(*_weight_and_bias(op, in_scale))
    module.scale, module.zero_point = out_qparams
    return module


class QuantizedBackend(nn.Module):
    """An ``Int8Model``'s program on torch's quantized kernels; implements ``Int8Backend``.

    Build it with ``fast_backend``. Shapes: (N, C, H, W) integer -> (N, num_classes) int32.
    """

    def __init__(self, model: Int8Model, engine: str) -> None:
        super().__init__()
        self.engine = engine
        self.inputs = model.inputs
        self.input_step, self.input_zero_point = model.input_step, model.input_zero_point
        qparams = model.value_qparams
        steps = []
        with _quantized_engine(engine):
            for index, (op, args) in enumerate(zip(model.ops, model.inputs)):
                in_qparams, out_qparams = [qparams[i] for i in args], qparams[index + 1]
                if isinstance(op, IntConv2d):  # torch pads with the zero point; other padding is done first
                    zero_padding = bool(torch.all(op.pad_value == op.in_zero_point))
                    module = _affine_module(op, in_qparams[0][0], out_qparams, op.padding if zero_padding else (0, 0))
                    pad = None if zero_padding or not any(op.padding) else (op.padding, op.pad_value)
                    steps.append(_Quantized(module, in_qparams, pad))
                elif isinstance(op, IntLinear) and not op.logits:
                    steps.append(_Quantized(_affine_module(op, in_qparams[0][0], out_qparams, (0, 0)), in_qparams))
                elif isinstance(op, IntAdd):
                    steps.append(_Quantized(_Add(op, out_qparams), in_qparams))
                elif isinstance(op, IntMaxPool2d):
                    steps.append(_Quantized(_MaxPool(op), in_qparams))
                elif isinstance(op, IntFlatten):
                    steps.append(_Flatten())  # works on quantized and integer tensors alike
                else:  # global average pooling and the int32 logits layer: exact integer ops
                    steps.append(_Integer(op))
        self.steps = nn.ModuleList(steps)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        codes = lattice_codes(images, self.input_step, self.input_zero_point)  # (N, C, H, W) uint8
        with _quantized_engine(self.engine):
            return run_program(self.steps, self.inputs, codes)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """int32 logits (N, num_classes), in the reference model's units, of integer lattice values (N, C, H, W)."""
        return self(images)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Top-1 labels (N,) int64 of integer lattice values (N, C, H, W); ties go to the lowest class index."""
        return self(images).argmax(1)


def fast_backend(model: Int8Model, engine: str = "x86") -> QuantizedBackend:
    """Run ``model``'s int8 parameters on torch's quantized CPU kernels, several times faster.

    Args:
        model: an ``Int8Model`` from ``convert`` or ``load_int8``; its parameters are used as they are.
        engine: the torch quantized engine, one of "x86" (default), "fbgemm", "onednn".

    Predictions agree with ``model`` on all but rare inputs (rounding, see the module docstring).
    """
    if not isinstance(model, Int8Model):
        raise ValueError(f"fast_backend takes an Int8Model, got {type(model).__name__}")
    available = [name for name in ENGINES if name in torch.backends.quantized.supported_engines]
    if engine not in available:
        raise ValueError(f"engine must be one of {available} on this machine, got {engine!r}")
    if _has_vnni() is False:
        warnings.warn(
            "this CPU has no VNNI: torch's AVX2 int8 kernels may saturate with full-range uint8 activations, "
            "so the fast backend can disagree with the reference engine more often",
            RuntimeWarning,
            stacklevel=2,
        )
    return QuantizedBackend(model, engine)
