"""Adaptive certification: valid under optional stopping (by simulation with known pA), and frugal, with
the confidence sequence (default) and the union-bound schedule."""

import numpy as np
import pytest
import torch
from scipy.stats import binom, norm

from qrobust.errors import QRobustError
from qrobust.smoothing import FloatRS, SmoothedClassifier
from qrobust.smoothing.adaptive import SampleSchedule, certify_adaptive, union_bound_radius

SIGMA = 0.25
RADII = (0.0, 0.25, 0.5, 0.75)


def _simulate(
    p: float, trials: int, alpha: float, schedule: SampleSchedule, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Certified radii (nan: abstain) and samples used for ``trials`` inputs whose true pA is ``p``."""
    rng = np.random.default_rng(seed)
    method = FloatRS(SIGMA)
    radii, used = np.full(trials, np.nan), np.zeros(trials, dtype=int)
    for t in range(trials):
        radius, _, drawn = union_bound_radius(lambda k: int(rng.binomial(k, p)), method.radius, schedule, alpha, RADII)
        radii[t] = np.nan if radius is None else radius
        used[t] = drawn
    return radii, used


def test_schedule_is_geometric_and_ends_at_n_max():
    assert SampleSchedule(10_000, start=1_000).checkpoints == (1_000, 2_000, 4_000, 8_000, 10_000)
    assert SampleSchedule(500, start=1_000).checkpoints == (500,)
    assert SampleSchedule(10, start=1, growth=1.1).checkpoints[:3] == (1, 2, 3)


@pytest.mark.parametrize("kwargs", [{"n_max": 0}, {"n_max": 10, "start": 0}, {"n_max": 10, "growth": 1.0}])
def test_schedule_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        SampleSchedule(**kwargs)


# True radii sigma * Phi^-1(p) sit just above table radii (0.25 -> p = 0.8413, 0.5 -> 0.9772), where a
# sequential test is most tempted to over-certify, and near 1 where it stops earliest.
@pytest.mark.parametrize("p", [0.845, 0.978, 0.9995])
def test_false_certification_rate_stays_below_alpha(p):
    alpha, trials = 0.1, 1500
    radii, _ = _simulate(p, trials, alpha, SampleSchedule(20_000, start=250), seed=1)
    false = int(np.sum(radii > SIGMA * norm.ppf(p)))
    assert false <= binom.ppf(0.999, trials, alpha), f"{false} false certificates of {trials}"


def test_peeking_at_the_full_level_would_over_certify():
    """The union bound is needed: testing every checkpoint at level alpha breaks the guarantee, and the
    simulation above is sharp enough to see it."""
    alpha, trials = 0.1, 1500
    schedule = SampleSchedule(20_000, start=250)
    p = norm.cdf(0.5 / SIGMA) + 0.0005  # true radius just above 0.5
    k = len(schedule.checkpoints)
    radii, _ = _simulate(p, trials, alpha * k, schedule, seed=2)  # level alpha per checkpoint
    false = int(np.sum(radii > SIGMA * norm.ppf(p)))
    assert false > binom.ppf(0.999, trials, alpha)


def test_settled_inputs_stop_early():
    schedule = SampleSchedule(100_000)
    _, confident = _simulate(0.99999, 50, 0.001, schedule, seed=3)  # certifies r = 0.75 quickly
    _, hopeless = _simulate(0.2, 50, 0.001, schedule, seed=4)  # never reaches pA > 1/2
    assert confident.max() <= 16_000 and hopeless.max() == 1_000


def test_single_checkpoint_is_plain_certify(linear_binary):
    """With one checkpoint at n (n_max below the first round) the union test is CERTIFY at level alpha."""
    smoothed = SmoothedClassifier(linear_binary, 2, FloatRS(0.5), batch_size=64)
    x = torch.full((1, 2, 2), 0.5)
    plain = smoothed.certify(x, n0=50, n=700, alpha=0.01, generator=torch.Generator().manual_seed(5))
    adaptive = certify_adaptive(
        smoothed,
        x,
        n0=50,
        n_max=700,
        alpha=0.01,
        radii=RADII,
        sequential="union",
        generator=torch.Generator().manual_seed(5),
    )
    assert adaptive.label == plain.label and adaptive.radius == plain.radius and adaptive.p_lower == plain.p_lower
    np.testing.assert_array_equal(adaptive.counts, plain.counts)


@pytest.mark.parametrize("sequential, most", [("cs", 5_000), ("union", 16_000)])
def test_certify_adaptive_is_sound_and_frugal(linear_binary, sequential, most):
    """LinearBinary's smoothed radius is exactly |w.x + b| / ||w||; the adaptive radius stays below it."""
    smoothed = SmoothedClassifier(linear_binary, 2, FloatRS(SIGMA), batch_size=500, noise_bank_seed=0)
    x = torch.tensor([0.9, 0.1, 0.3, 0.7]).reshape(1, 2, 2)  # margin 0.36 (class 1)
    certificate = certify_adaptive(
        smoothed, x, n0=100, n_max=100_000, alpha=0.001, radii=(0.25,), sequential=sequential
    )
    assert certificate.label == 1
    assert 0.25 <= certificate.radius <= linear_binary.margin(x)
    assert certificate.samples == certificate.counts.sum() <= most


@pytest.mark.parametrize("sequential", ["cs", "union"])
def test_false_certification_rate_through_the_smoothed_classifier(linear_binary, sequential):
    """End to end with known pA: LinearBinary at margin 0.32 has pA = Phi(0.32 / sigma) = 0.8997 and true
    radius 0.32; a certificate above 0.32 is false. 300 seeded inputs at alpha = 0.1: at most
    binom.ppf(0.999, 300, 0.1) = 47 false ones; the vote share in place of pA_lower (no confidence
    bound) would exceed pA, and so certify more than 0.32, about half the time."""
    alpha, trials = 0.1, 300
    smoothed = SmoothedClassifier(linear_binary, 2, FloatRS(SIGMA), batch_size=100)
    x = torch.tensor([0.9, 0.15, 0.3, 0.3]).reshape(1, 2, 2)
    margin = linear_binary.margin(x)
    assert margin == pytest.approx(0.32)
    false = 0
    for t in range(trials):
        certificate = certify_adaptive(
            smoothed,
            x,
            n0=10,
            n_max=2_000,
            alpha=alpha,
            radii=(0.25, 0.3),
            sequential=sequential,
            generator=torch.Generator().manual_seed(t),
        )
        assert certificate.samples <= 2_000
        false += certificate.radius > margin
    assert false <= binom.ppf(0.999, trials, alpha)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"sequential": "bayes"}, "sequential must be"),
        ({"radii": ()}, "radii"),
        ({"radii": (0.1, -1.0)}, "radii"),
        ({"n_max": 0}, "n_max"),
    ],
)
def test_certify_adaptive_rejects_bad_arguments(linear_binary, change, message):
    smoothed = SmoothedClassifier(linear_binary, 2, FloatRS(SIGMA))
    arguments = {"n0": 10, "n_max": 100, "alpha": 0.01, "radii": RADII} | change
    with pytest.raises(QRobustError, match=message):
        certify_adaptive(smoothed, torch.full((1, 2, 2), 0.5), **arguments)
