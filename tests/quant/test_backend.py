"""Tests for qrobust.quant.backend: the fast torch int8 backend agrees with the reference engine."""

from __future__ import annotations

import pytest
import torch

from qrobust.quant import Int8Backend, fast_backend
from qrobust.quant.backend import ENGINES, _quantized_engine
from qrobust.smoothing import FloatRSQuant, IntRS, SmoothedClassifier

from .conftest import QUANTIZABLE, intrs_noisy

pytestmark = pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")  # torch.ao deprecation

ENGINES_HERE = [engine for engine in ENGINES if engine in torch.backends.quantized.supported_engines]


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


@pytest.mark.parametrize("engine", ENGINES_HERE)
def test_fast_backend_agrees_with_reference_on_noisy_images(engine: str, noisy_cnn) -> None:
    q, images, reference = noisy_cnn
    fast = fast_backend(q.int8, engine)(images)
    assert float((reference.argmax(1) == fast.argmax(1)).float().mean()) >= 0.995
    assert float((reference == fast).all(1).float().mean()) >= 0.9  # most logit vectors are identical


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
    reference, fast = q.int8(q.images), fast_backend(q.int8)(q.images)
    assert float((reference.argmax(1) == fast.argmax(1)).float().mean()) >= 0.99


@pytest.mark.parametrize("name", QUANTIZABLE)
def test_every_fast_op_matches_the_reference_op(name: str, quantized) -> None:
    """Fed the same integers, torch's kernels and the reference ops differ only where torch's float32
    requantization rounds the other way near a grid midpoint (within ~1e-5 of it): at most 1 step,
    on < 0.1% of values (adds of similar scales hit near-midpoints most often)."""
    q = quantized(name)
    fast = fast_backend(q.int8)
    values = [q.images[:64]]
    with torch.no_grad(), _quantized_engine(fast.engine):
        for op, step, args in zip(q.int8.ops, fast.steps, q.int8.inputs):
            inputs = [values[i] for i in args]
            expected, got = op(*inputs), step(*inputs)
            got = got.int_repr() if got.is_quantized else got
            difference = (expected.long() - got.long()).abs()
            assert int(difference.max()) <= 1 and float((difference > 0).double().mean()) <= 1e-3, op.kind
            values.append(expected)


def test_fast_backend_checks_its_arguments(quantized) -> None:
    q = quantized("mlp")
    with pytest.raises(ValueError, match="engine must be one of"):
        fast_backend(q.int8, "tpu")
    with pytest.raises(ValueError, match="takes an Int8Model"):
        fast_backend(q.qat)
    with pytest.raises(ValueError, match="integer lattice values"):
        fast_backend(q.int8)(q.images.float())


def test_fast_backend_restores_the_quantized_engine(quantized) -> None:
    before = torch.backends.quantized.engine
    fast_backend(quantized("mlp").int8, ENGINES_HERE[-1])(quantized("mlp").images)
    assert torch.backends.quantized.engine == before
