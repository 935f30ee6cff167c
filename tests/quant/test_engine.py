"""Tests for qrobust.quant.engine: integer-only execution and each op against exact arithmetic."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from qrobust.quant import Int8Model
from qrobust.quant.engine import IntAdd, IntConv2d, IntFlatten, IntGlobalAvgPool, IntLinear, IntMaxPool2d
from qrobust.quant.numerics import quantize_multipliers, requantize

from .conftest import QUANTIZABLE, intrs_noisy


class DtypeRecorder(TorchDispatchMode):
    """Records the dtypes of every tensor that every aten op reads or writes while active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, set[torch.dtype]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        self.calls.append((str(func), {t.dtype for t in tensors}))
        return out

    def float_calls(self) -> list[tuple[str, set[torch.dtype]]]:
        real = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128)
        return [(name, dtypes) for name, dtypes in self.calls if dtypes & set(real)]


@pytest.mark.parametrize("name, margin", [(name, 0) for name in QUANTIZABLE] + [("cnn", 255), ("resnet20", 383)])
def test_every_op_of_the_engine_is_integer(name: str, margin: int, quantized) -> None:
    """Including the input quantizer: unclipped int16 x + noise to uint8 codes by integer division."""
    q = quantized(name, margin=margin)
    outputs = {}
    hooks = [
        op.register_forward_hook(lambda module, args, out, i=i: outputs.__setitem__(i, out.dtype))
        for i, op in enumerate(q.int8.ops)
    ]
    images = intrs_noisy(q.images[:4], 0.5, seed=0) if margin else q.images[:4]
    recorder = DtypeRecorder()
    with recorder:
        logits = q.int8(images)
    for hook in hooks:
        hook.remove()
    assert len(recorder.calls) > 3 * len(q.int8.ops)  # every aten op of the forward pass was seen
    assert recorder.float_calls() == []
    assert logits.dtype == torch.int32
    assert [outputs[i] for i in range(len(q.int8.ops) - 1)] == [torch.uint8] * (len(q.int8.ops) - 1)


def test_dtype_recorder_catches_float_ops(quantized) -> None:
    q = quantized("cnn")
    recorder = DtypeRecorder()
    with recorder, torch.no_grad():
        q.qat(q.images[:2].float() / 255)
    assert recorder.float_calls()


def _affine(op: IntConv2d | IntLinear, generator: torch.Generator, reals: torch.Tensor) -> None:
    op.weight.copy_(torch.randint(-127, 128, op.weight.shape, generator=generator, dtype=torch.int8))
    op.bias.copy_(torch.randint(-5000, 5000, op.bias.shape, generator=generator, dtype=torch.int32))
    multiplier, shift = quantize_multipliers(reals)
    op.multiplier.copy_(multiplier)
    op.shift.copy_(shift)


@pytest.mark.parametrize("stride, padding", [((1, 1), (1, 1)), ((2, 2), (1, 1)), ((2, 1), (0, 2))])
def test_int_conv_is_exact_convolution_then_requantization(stride, padding) -> None:
    generator = torch.Generator().manual_seed(0)
    op = IntConv2d((5, 3, 3, 3), stride, padding, in_zero_point=17, out_zero_point=9, relu=True, logits=False)
    _affine(op, generator, torch.rand(5, generator=generator) * 1e-3 + 1e-4)
    op.pad_value.copy_(torch.tensor([17, 100, 3], dtype=torch.uint8))
    x = torch.randint(0, 256, (2, 3, 7, 6), generator=generator, dtype=torch.uint8)
    # Reference in float64, exact for these small integers: pad with the pad values, then convolve.
    padded = F.pad(x.double() - 17, (padding[1],) * 2 + (padding[0],) * 2, value=math.nan)
    fill = (op.pad_value.double() - 17).view(1, 3, 1, 1).expand_as(padded)
    padded = torch.where(padded.isnan(), fill, padded)
    acc = F.conv2d(padded, op.weight.double(), op.bias.double(), stride)  # (N, O, OH, OW)
    expected = requantize(acc.round().to(torch.int64).permute(0, 2, 3, 1), op.multiplier, op.shift) + 9
    expected = expected.clamp(9, 255).permute(0, 3, 1, 2)
    out = op(x)
    assert out.dtype == torch.uint8
    assert torch.equal(out.long(), expected)


def test_int_linear_logits_are_unclamped_int32() -> None:
    generator = torch.Generator().manual_seed(1)
    op = IntLinear((4, 6), in_zero_point=3, out_zero_point=0, relu=False, logits=True)
    _affine(op, generator, torch.ones(4))
    x = torch.randint(0, 256, (5, 6), generator=generator, dtype=torch.uint8)
    expected = (x.long() - 3) @ op.weight.long().t() + op.bias.long()
    assert op(x).dtype == torch.int32
    assert torch.equal(op(x).long(), expected)


def test_int_add_rounds_the_rescaled_sum_once() -> None:
    generator = torch.Generator().manual_seed(2)
    op = IntAdd((5, 200), out_zero_point=11, shift=33, relu=False)
    op.multipliers.copy_(torch.tensor([2**31 - 7, 2**30 + 12345], dtype=torch.int32))
    a, b = (torch.randint(0, 256, (400,), generator=generator, dtype=torch.uint8) for _ in range(2))
    out = op(a, b)
    for qa, qb, q in zip(a.tolist(), b.tolist(), out.tolist()):
        total = Fraction((2**31 - 7) * (qa - 5) + (2**30 + 12345) * (qb - 200), 2**33)
        assert q == min(max(11 + math.floor(total + Fraction(1, 2)), 0), 255)


def test_int_avgpool_is_rounded_rational_mean() -> None:
    generator = torch.Generator().manual_seed(3)
    op = IntGlobalAvgPool(in_zero_point=30, out_zero_point=4, multiplier=3 * 2**29, shift=30)  # s_in/s_out = 1.5
    x = torch.randint(0, 256, (3, 4, 5, 7), generator=generator, dtype=torch.uint8)
    out = op(x)
    assert out.shape == (3, 4, 1, 1) and out.dtype == torch.uint8
    for value, window in zip(out.flatten().tolist(), x.flatten(0, 1).long() - 30):
        mean = Fraction(int(window.sum()), window.numel()) * Fraction(3, 2)
        assert value == min(max(4 + math.floor(mean + Fraction(1, 2)), 0), 255)


def test_int_maxpool_matches_float_maxpool() -> None:
    x = torch.randint(0, 256, (2, 3, 9, 8), generator=torch.Generator().manual_seed(4), dtype=torch.uint8)
    op = IntMaxPool2d((3, 3), (2, 2), (1, 1))
    assert torch.equal(op(x).double(), F.max_pool2d(x.double(), 3, 2, 1))
    assert IntFlatten()(x).shape == (2, 3 * 9 * 8)


def test_int8_model_takes_integer_lattice_values_only(quantized) -> None:
    q = quantized("mlp")
    with pytest.raises(ValueError, match="integer lattice values"):
        q.int8(q.images.float() / 255)
    with pytest.raises(ValueError, match="integer lattice values"):
        q.int8(q.images[0])


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_margin_zero_clips_unclipped_inputs_as_before(name: str, quantized) -> None:
    """Without an input margin the model reads clamp(x + n, 0, 255): exactly the old clipped uint8 input."""
    q = quantized(name)
    noisy = intrs_noisy(q.images[:64], 0.5, seed=1)  # int16, far outside [0, 255]
    assert int(noisy.min()) < 0 and int(noisy.max()) > 255
    assert torch.equal(q.int8.input_codes(noisy), noisy.clamp(0, 255).to(torch.uint8))
    assert torch.equal(q.int8(noisy), q.int8(noisy.clamp(0, 255).to(torch.uint8)))
    assert torch.equal(q.int8(noisy.int()), q.int8(noisy))


def test_int8_model_validates_its_program() -> None:
    with pytest.raises(ValueError, match="may only read values"):
        Int8Model([IntFlatten()], [(1,)], [(1 / 255, 0), (1 / 255, 0)])
    with pytest.raises(ValueError, match="one input list per op"):
        Int8Model([IntFlatten()], [], [(1 / 255, 0)])
    with pytest.raises(ValueError, match="do not match input margin 255"):
        Int8Model([IntFlatten()], [(0,)], [(1 / 255, 0), (1 / 255, 0)], input_margin=255)
    with pytest.raises(ValueError, match="input_margin must be"):
        Int8Model([IntFlatten()], [(0,)], [(1 / 255, 0), (1 / 255, 0)], input_margin=-1)


@pytest.mark.parametrize("margin", [0, 383])
def test_spec_round_trip_rebuilds_the_same_program(margin: int, quantized) -> None:
    q = quantized("resnet20", margin=margin)
    rebuilt = Int8Model.from_spec(q.int8.spec())
    rebuilt.load_state_dict(q.int8.state_dict())
    assert rebuilt.spec() == q.int8.spec() and rebuilt.input_margin == margin
    noisy = intrs_noisy(q.images[:8], 0.5, seed=2)
    assert torch.equal(rebuilt(noisy), q.int8(noisy))
