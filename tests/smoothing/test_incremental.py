import math

import numpy as np
import pytest
import torch
from torch import nn

from qrobust.smoothing import (
    FloatRS,
    FloatRSQuant,
    IntRS,
    SmoothedClassifier,
    acr,
    certify_incremental,
    certify_original,
    example_generator,
)
from qrobust.smoothing.confidence import clopper_pearson_lower

SIGMA = 0.25


class Probe(nn.Module):
    """Records every batch of noisy inputs, then classifies them with ``linear`` on the [0, 1] scale
    (lattice inputs, integer or float-valued as FloatRSQuant and IntRS pass them, are divided by 255)."""

    def __init__(self, linear: nn.Module, lattice: bool = False):
        super().__init__()
        self.linear, self.lattice, self.seen = linear, lattice, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return self.linear(x.float() / 255 if self.lattice else x)


def _images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 1, 2, 2, generator=torch.Generator().manual_seed(seed))


def _rotated(linear_binary, angle: float, bias: float):
    """The fixture's classifier with w rotated by ``angle`` in its first two coordinates (||w|| stays 1)."""
    w = linear_binary.weight
    c, s = math.cos(angle), math.sin(angle)
    weight = torch.tensor([c * w[0] - s * w[1], s * w[0] + c * w[1], 0.0, 0.0])
    return type(linear_binary)(weight.reshape(1, 2, 2), bias=bias)


@pytest.mark.parametrize(("angle", "bias"), [(0.0, -0.16), (0.15, -0.1), (-0.1, -0.05)])
def test_certificates_never_exceed_the_exact_radius_of_the_modified_model(linear_binary, angle, bias):
    """LinearBinary's smoothed classifier is the half-space itself: the exact radius at x is
    |w.x + b| / ||w|| and the class sign(w.x + b). A certificate is wrong iff its label differs or its
    radius exceeds that; each input fails with probability <= alpha + alpha_zeta = 2e-6, so none may."""
    modified = _rotated(linear_binary, angle, bias)
    images = _images(150)
    original = SmoothedClassifier(linear_binary, 2, FloatRS(SIGMA), batch_size=2000)
    cache = certify_original(original, images, n0=100, n=10_000, alpha=1e-6, seed=1)
    smoothed = SmoothedClassifier(modified, 2, FloatRS(SIGMA), batch_size=2000)
    certificates = certify_incremental(cache, smoothed, n_zeta=2000, alpha_zeta=1e-6, gamma=0.99)
    margins = np.array([modified.margin(x) for x in images])  # ||w'|| = 1
    answered = np.array([not c.abstained for c in certificates])
    labels = np.array([-1 if c.abstained else c.label for c in certificates])
    radii = np.array([c.radius for c in certificates])
    assert np.all(labels[answered] == (margins[answered] > 0))
    assert np.all(radii[answered] <= np.abs(margins[answered]))
    # The test has teeth: the cached radii of the original overshoot the modified model's on some inputs,
    # both paths run, and the incremental certificates are not vacuous.
    cached = np.array([c.radius for c in cache.certificates])
    assert np.any(cached > np.abs(margins) + 0.01)
    incremental = np.array([not c.fallback for c in certificates]) & answered
    assert 20 <= incremental.sum() and any(c.fallback for c in certificates)
    assert np.median(radii[incremental] / np.abs(margins[incremental])) > 0.6


@pytest.mark.parametrize(("method", "lattice"), [(FloatRS(0.5), False), (IntRS(0.5), True)])
def test_replay_reproduces_the_original_noise_and_certificates(linear_binary, method, lattice):
    """Batch size, n0 and n_zeta that split batches: the replayed noise is the cached run's, bit for bit."""
    n0, n, num, seed = 50, 300, 130, 5
    images = (_images(3, seed=1) * 255).round().to(torch.uint8) if lattice else _images(3, seed=1)
    probe = Probe(linear_binary, lattice)
    smoothed = SmoothedClassifier(probe, 2, method, batch_size=64)
    cache = certify_original(smoothed, images, n0=n0, n=n, alpha=0.01, seed=seed)
    seen = torch.cat(probe.seen).reshape(len(images), n0 + n, 1, 2, 2)  # per input: selection, then estimation
    plain = SmoothedClassifier(Probe(linear_binary, lattice), 2, method, batch_size=64)
    for index, x in enumerate(images):
        replayed = method.apply(x.unsqueeze(0).expand(num, *x.shape), cache.replay_noise(index, num))
        assert torch.equal(replayed, seen[index, n0 : n0 + num])
        expected = plain.certify(x, n0=n0, n=n, alpha=0.01, generator=example_generator(seed, index))
        assert np.array_equal(cache.certificates[index].counts, expected.counts)
        assert (cache.certificates[index].label, cache.certificates[index].radius) == (expected.label, expected.radius)
        assert np.array_equal(np.bincount(cache.predictions[index], minlength=2), expected.counts)


def test_unchanged_model_gives_the_bound_of_zero_disagreements(linear_binary):
    n_zeta, alpha_zeta = 700, 0.01
    smoothed = SmoothedClassifier(linear_binary, 2, FloatRS(SIGMA), batch_size=256)
    cache = certify_original(smoothed, _images(20), n0=50, n=1000, alpha=0.001)
    certificates = certify_incremental(cache, smoothed, n_zeta=n_zeta, alpha_zeta=alpha_zeta, gamma=1.0)
    estimated = [(c, cached) for c, cached in zip(certificates, cache.certificates) if not cached.abstained]
    assert len(estimated) >= 15
    for certificate, cached in estimated:
        assert certificate.zeta == pytest.approx(1 - alpha_zeta ** (1 / n_zeta), rel=1e-9)  # 0 of n_zeta disagree
        assert certificate.p_lower == pytest.approx(cached.p_lower - certificate.zeta, abs=1e-12)
        assert certificate.label == cached.label and not certificate.fallback
        assert certificate.radius < cached.radius


class Constant(nn.Module):
    """Always predicts ``label`` of 2 classes."""

    def __init__(self, label: int):
        super().__init__()
        self.label = label

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(torch.full((len(x),), self.label), 2).float()


def test_zeta_counts_only_draws_that_leave_the_top_class(linear_binary):
    """A model that always says c_A loses nothing (zeta of 0 departures, though it disagrees with f
    wherever f says the other class); one that never says c_A departs on every draw f gave c_A."""
    n_zeta, alpha_zeta = 400, 0.01
    original = SmoothedClassifier(linear_binary, 2, FloatRS(SIGMA))
    cache = certify_original(original, _images(30), n0=50, n=1000, alpha=0.001)
    by_label = [
        certify_incremental(
            cache,
            SmoothedClassifier(Constant(label), 2, FloatRS(SIGMA)),
            n_zeta=n_zeta,
            alpha_zeta=alpha_zeta,
            gamma=1.0,
        )
        for label in (0, 1)
    ]
    estimated = [index for index, cached in enumerate(cache.certificates) if not cached.abstained]
    assert len(estimated) >= 20
    assert any(np.any(cache.predictions[i, :n_zeta] != cache.certificates[i].label) for i in estimated)  # teeth
    for index in estimated:
        label = cache.certificates[index].label
        kept, left = by_label[label][index], by_label[1 - label][index]
        on_top = int(np.count_nonzero(cache.predictions[index, :n_zeta] == label))
        assert kept.zeta == pytest.approx(1 - alpha_zeta ** (1 / n_zeta), rel=1e-9)
        assert left.zeta == pytest.approx(1 - clopper_pearson_lower(n_zeta - on_top, n_zeta, alpha_zeta), rel=1e-9)


def test_lattice_reading_modified_model_shares_the_noise(linear_binary):
    """FloatRSQuant draws FloatRS's noise; rounding to the lattice rarely flips the linear classifier."""
    original = SmoothedClassifier(linear_binary, 2, FloatRS(SIGMA))
    cache = certify_original(original, _images(10), n0=50, n=1000, alpha=0.001)
    quantized = SmoothedClassifier(Probe(linear_binary, lattice=True), 2, FloatRSQuant(SIGMA))
    certificates = certify_incremental(cache, quantized, n_zeta=1000, alpha_zeta=0.001, gamma=1.0)
    zetas = [c.zeta for c in certificates if c.zeta is not None]
    assert zetas and max(zetas) < 0.02  # 0 disagreements give 0.0069; a different noise would give ~0.3


@pytest.mark.parametrize(("gamma", "n_fallback"), [(0.0, None), (0.9, None), (0.97, 800), (1.0, None)])
def test_fallback_is_taken_exactly_when_the_cached_bound_reaches_gamma(linear_binary, gamma, n_fallback):
    n_zeta = 300
    original = SmoothedClassifier(linear_binary, 2, FloatRS(SIGMA))
    cache = certify_original(original, _images(40), n0=50, n=1000, alpha=0.01)
    modified = SmoothedClassifier(Probe(_rotated(linear_binary, 0.1, -0.12)), 2, FloatRS(SIGMA))
    certificates = certify_incremental(
        cache, modified, n_zeta=n_zeta, alpha_zeta=0.01, gamma=gamma, n_fallback=n_fallback, seed=3
    )
    fallback = np.array([c.fallback for c in certificates])
    assert np.array_equal(fallback, [cached.p_lower >= gamma for cached in cache.certificates])
    if 0.0 < gamma < 1.0:
        assert 0 < fallback.sum() < len(fallback)  # both paths are exercised
    for certificate, cached in zip(certificates, cache.certificates):
        if certificate.fallback:
            assert certificate.zeta is None and certificate.counts.sum() == (n_fallback or n_zeta)
        else:
            assert (certificate.zeta is None) == cached.abstained
    if gamma == 0.0:  # the fallback draws fresh noise, not the cached run's (whose first batch selected)
        first = modified.base.seen[0]  # (50, 1, 2, 2): the fallback's selection batch for input 0
        original = FloatRS(SIGMA).perturb(cache.images[0].expand_as(first), example_generator(cache.seed, 0))
        assert first.shape == original.shape and not torch.equal(first, original)


def test_acr_counts_only_correct_certificates(linear_binary):
    smoothed = SmoothedClassifier(linear_binary, 2, FloatRS(SIGMA))
    cache = certify_original(smoothed, _images(12), n0=50, n=500, alpha=0.01)
    labels = [c.label if c.label is not None else 0 for c in cache.certificates]
    expected = sum(c.radius for c in cache.certificates if not c.abstained) / 12
    assert acr(cache.certificates, labels) == pytest.approx(expected)
    assert expected > 0 and acr(cache.certificates, [1 - y for y in labels]) == 0.0
    with pytest.raises(ValueError, match="one label per certificate"):
        acr(cache.certificates, labels[:-1])


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"n_zeta": 0}, "n_zeta must be an integer >= 1"),
        ({"n_zeta": 501}, "n_zeta must be <= the cached n=500"),
        ({"alpha_zeta": 0.0}, "alpha_zeta must be in"),
        ({"alpha_zeta": 1.0}, "alpha_zeta must be in"),
        ({"gamma": 1.5}, "gamma must be in"),
        ({"gamma": -0.1}, "gamma must be in"),
        ({"method": FloatRS(0.5)}, "same noise"),
        ({"method": IntRS(SIGMA)}, "same noise"),
        ({"num_classes": 3}, "3 classes|2 classes"),
    ],
)
def test_incremental_rejects_bad_arguments(linear_binary, arguments, message):
    cache = certify_original(SmoothedClassifier(linear_binary, 2, FloatRS(SIGMA)), _images(2), n0=10, n=500, alpha=0.01)
    num_classes, method = arguments.pop("num_classes", 2), arguments.pop("method", FloatRS(SIGMA))
    modified = SmoothedClassifier(linear_binary, num_classes, method)
    with pytest.raises(ValueError, match=message):
        certify_incremental(cache, modified, **({"n_zeta": 100, "alpha_zeta": 0.01, "gamma": 0.99} | arguments))


def test_original_rejects_bad_arguments(linear_binary):
    smoothed = SmoothedClassifier(linear_binary, 2, FloatRS(SIGMA))
    with pytest.raises(ValueError, match="noise_bank_seed"):
        banked = SmoothedClassifier(linear_binary, 2, FloatRS(SIGMA), noise_bank_seed=0)
        certify_original(banked, _images(2), n0=10, n=10, alpha=0.01)
    with pytest.raises(ValueError, match="non-empty"):
        certify_original(smoothed, _images(1)[0], n0=10, n=10, alpha=0.01)
    with pytest.raises(ValueError, match="n must"):
        certify_original(smoothed, _images(2), n0=10, n=0, alpha=0.01)
    with pytest.raises(ValueError, match="alpha"):
        certify_original(smoothed, _images(2), n0=10, n=10, alpha=1.0)
