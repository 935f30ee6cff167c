"""Tests for qrobust.quant.backend: the fast oneDNN int8 backend agrees with the reference engine, uses no
deprecated torch API, creates no quantized tensor, and works around two pinned torch 2.13 defects."""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path

import pytest
import torch

import qrobust
from qrobust.quant import Int8Backend, fast_backend
from qrobust.quant.backend import _Add, _FlattenChannelsLast, _MaxPool
from qrobust.quant.engine import IntAdd, IntMaxPool2d
from qrobust.smoothing import FloatRSQuant, IntRS, SmoothedClassifier

from .conftest import QUANTIZABLE, intrs_noisy


def noisy(images: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    """``images`` plus Gaussian noise of std ``sigma`` (in [0, 1] units), back on the uint8 lattice."""
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)) * (255 * sigma)
    return (images.float() + noise).round().clamp(0, 255).to(torch.uint8)


def test_both_engines_implement_the_backend_protocol(quantized) -> None:
    q = quantized("mlp")
    fast = fast_backend(q.int8)
    assert isinstance(q.int8, Int8Backend) and isinstance(fast, Int8Backend)
    assert fast.predict(q.images).dtype == torch.int64 and fast.logits(q.images).dtype == torch.int32


@pytest.fixture(scope="module")
def noisy_cnn(quantized):
    """The CNN on 2000 Fashion-MNIST-sized images with sigma = 0.25 noise, and its reference logits."""
    q = quantized("cnn", n=2000)
    images = noisy(q.images, 0.25, seed=7)
    return q, images, q.int8(images)


def test_fast_backend_agrees_with_reference_on_noisy_images(noisy_cnn) -> None:
    q, images, reference = noisy_cnn
    fast = fast_backend(q.int8)(images)
    assert float((reference.argmax(1) == fast.argmax(1)).float().mean()) >= 0.999
    assert float((reference == fast).all(1).float().mean()) >= 0.95  # most int32 logit vectors are identical


@pytest.mark.parametrize("name, margin", [("cnn", 0), ("cnn", 383), ("resnet20", 255)])
def test_fast_backend_agrees_on_unclipped_intrs_inputs(name: str, margin: int, quantized) -> None:
    """IntRS at sigma = 0.5 feeds int16 x + n, far outside [0, 255]: both engines read it through the same
    integer input quantizer (clipping it without a margin, widening the range with one)."""
    q = quantized(name, n=2000 if name == "cnn" else 512, margin=margin)
    noisy = intrs_noisy(q.images, 0.5, seed=7)
    reference, fast = q.int8(noisy), fast_backend(q.int8)(noisy)
    assert float((reference.argmax(1) == fast.argmax(1)).float().mean()) >= 0.995
    if margin == 0:
        assert torch.equal(fast, fast_backend(q.int8)(noisy.clamp(0, 255).to(torch.uint8)))


@pytest.mark.parametrize("method", [IntRS(0.5), FloatRSQuant(0.5)])
@pytest.mark.parametrize("bank", [None, 3])
def test_smoothing_feeds_unclipped_lattice_values_to_both_engines(method, bank, quantized) -> None:
    """The methods' int16 x + n, fresh or from the noise bank, runs through either engine alike."""
    q = quantized("cnn", margin=383)
    reference, fast = (
        SmoothedClassifier(base, 10, method, batch_size=100, noise_bank_seed=bank).certify(
            q.images[0], n0=20, n=200, alpha=0.01, generator=torch.Generator().manual_seed(3)
        )
        for base in (q.int8, fast_backend(q.int8))
    )
    assert int(reference.counts.sum()) == 200
    assert int(abs(reference.counts - fast.counts).sum()) <= 4  # the same noise: rare engine disagreements only


def test_fast_backend_agrees_on_a_resnet(quantized) -> None:
    q = quantized("resnet20", n=512)
    images = q.images.clone()
    reference, fast = q.int8(q.images), fast_backend(q.int8)(q.images)
    assert float((reference.argmax(1) == fast.argmax(1)).float().mean()) >= 0.99
    assert torch.equal(q.images, images)  # the adds that overwrite a dead input never touch the caller's


@pytest.mark.parametrize("name", QUANTIZABLE)
def test_every_fast_op_matches_the_reference_op(name: str, quantized) -> None:
    """Fed the same integers, oneDNN's kernels and the reference ops differ only where float32
    requantization rounds the other way near a grid midpoint (within ~1e-5 of it): at most 1 step,
    on < 0.1% of values (adds of similar scales hit near-midpoints most often). Pooling and the logits
    layer are integer ops, identical to the reference's. A flatten of channels-last memory keeps
    (H, W, C) order, so the linear layer after it is fed that order (its weight columns match it)."""
    q = quantized(name)
    fast = fast_backend(q.int8)
    values = [q.images[:64]]  # the reference's values
    fed = list(values)  # the same values in the fast backend's layout
    with torch.no_grad():
        for op, step, args in zip(q.int8.ops, fast.steps, q.int8.inputs):
            expected = op(*[values[i] for i in args])
            got = step(*[fed[i].clone() for i in args])  # clones: an add may overwrite its second input
            values.append(expected)
            if isinstance(step, _FlattenChannelsLast):
                fed.append(got)
                continue
            fed.append(expected)
            difference = (expected.long() - got.long()).abs()
            assert int(difference.max()) <= 1 and float((difference > 0).double().mean()) <= 1e-3, op.kind
            if op.kind in ("maxpool", "avgpool", "flatten") or getattr(op, "logits", False):  # integer ops: exact
                assert torch.equal(expected, got), op.kind


@pytest.mark.parametrize("name", ["cnn", "resnet20"])
def test_fast_backend_uses_no_deprecated_api_and_creates_no_quantized_tensor(name: str, quantized, monkeypatch) -> None:
    """Building and running the backend warns of nothing, never calls torch's quantized-tensor factories, and
    every value it computes is a plain integer tensor (never quint8/qint8/qint32)."""
    q = quantized(name, n=32)

    def refuse(*args, **kwargs):
        raise AssertionError("the fast backend created a quantized tensor")

    for factory in (
        "quantize_per_tensor",
        "quantize_per_channel",
        "_make_per_tensor_quantized_tensor",
        "_make_per_channel_quantized_tensor",
    ):
        monkeypatch.setattr(torch, factory, refuse)
    dtypes = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # DeprecationWarning, UserWarning and any other warning fail the test
        fast = fast_backend(q.int8)
        for step in fast.steps:
            step.register_forward_hook(lambda module, args, output: dtypes.append((output.dtype, output.is_quantized)))
        fast(intrs_noisy(q.images, 0.25, seed=1))
    assert len(dtypes) == len(q.int8.ops)
    assert {dtype for dtype, _ in dtypes} <= {torch.uint8, torch.int32} and not any(flag for _, flag in dtypes)


def test_no_qrobust_module_imports_torch_ao() -> None:
    """The eager quantized-tensor API (torch.ao.quantization, torch.ao.nn.quantized) is retired from the package."""
    package = Path(qrobust.__file__).parent
    imports = re.compile(r"^\s*(from|import)\s+torch\.ao\b|torch\.ops\.quantized\.", re.MULTILINE)
    assert [str(path) for path in package.rglob("*.py") if imports.search(path.read_text())] == []


def test_fast_backend_survives_copies(quantized) -> None:
    """Prepacked oneDNN weights are opaque tensors; deep copies pack them again."""
    q = quantized("resnet20", n=32)
    fast = fast_backend(q.int8)
    assert torch.equal(copy.deepcopy(fast)(q.images), fast(q.images))


def test_add_replacement_matches_the_float_formula_on_every_uint8_pair() -> None:
    """The identity-conv add computes round(((a - za) sa + (b - zb) sb) / so) + zo, clamped (with ReLU: at zo
    too), on all 65,536 uint8 pairs, computed in float64 here; it stays within one step of the reference
    IntAdd, and leaves ``b`` alone unless told to consume it."""
    codes = torch.arange(256, dtype=torch.uint8)
    a, b = (
        grid.reshape(1, 1, 256, 256).expand(1, 16, 256, 256) for grid in torch.meshgrid(codes, codes, indexing="ij")
    )
    b_before = b.clone()
    (sa, za), (sb, zb), (so, zo) = (0.05, 30), (0.08, 140), (0.09, 60)
    exact = (((a.double() - za) * sa + (b.double() - zb) * sb) / so).round() + zo
    for relu in (False, True):
        reference = IntAdd((za, zb), zo, shift=31, relu=relu)
        reference.multipliers.copy_(torch.tensor([round(sa / so * 2**31), round(sb / so * 2**31)], dtype=torch.int32))
        got = _Add(reference, 16, [(sa, za), (sb, zb)], (so, zo), consume_b=False)(a, b)
        assert torch.equal(got.double(), exact.clamp(zo if relu else 0, 255))
        assert int((got.long() - reference(a, b).long()).abs().max()) <= 1
    assert torch.equal(b, b_before)


@pytest.mark.parametrize(
    "kernel, stride, padding", [((2, 2), (2, 2), (0, 0)), ((3, 3), (2, 2), (1, 1)), ((3, 2), (1, 2), (0, 1))]
)
def test_max_pool_replacement_is_exact(kernel, stride, padding) -> None:
    x = torch.randint(0, 256, (3, 8, 13, 11), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    reference = IntMaxPool2d(kernel, stride, padding)
    assert torch.equal(_MaxPool(reference)(x.contiguous(memory_format=torch.channels_last)), reference(x))


def test_upstream_qadd_still_reads_uint8_inputs_as_int8() -> None:
    """Pins a torch 2.13 defect: ``onednn::qadd``'s vectorized loop reads uint8 200 as int8 -56 (its scalar
    tail, numel % 16, is right). When this fails, torch has fixed it: measure qadd against ``_Add`` and
    drop the identity-conv workaround if it is faster."""
    x = torch.full((1, 16, 1, 1), 200, dtype=torch.uint8)
    out = torch.ops.onednn.qadd.tensor(x, 1.0, 0, torch.zeros_like(x), 1.0, 0, 1.0, 0, torch.uint8)
    assert out.flatten().tolist() == [0] * 16  # right: [200] * 16


def test_upstream_max_pool2d_still_refuses_channels_last_uint8() -> None:
    """Pins a torch 2.13 defect: uint8 ``max_pool2d`` on channels-last inputs checks C*H*W against the uint8
    maximum (255). When this fails, torch has fixed it: measure it against ``_MaxPool`` and drop the
    workaround if it is faster."""
    x = torch.zeros(1, 2, 12, 12, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="input_depth"):
        torch.nn.functional.max_pool2d(x, 2, 2)


def test_fast_backend_checks_its_arguments(quantized) -> None:
    q = quantized("mlp")
    with pytest.raises(ValueError, match="takes an Int8Model"):
        fast_backend(q.qat)
    with pytest.raises(ValueError, match="integer lattice values"):
        fast_backend(q.int8)(q.images.float())
