"""Randomized Clopper-Pearson: coverage exactly 1 - alpha (simulated, known pA), never below the ordinary bound,
alone and as the opt-in bound of ``SmoothedClassifier.certify``."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import binom, norm

from qrobust.errors import QRobustError
from qrobust.smoothing import FloatRS, LatticeRS, SmoothedClassifier
from qrobust.smoothing.confidence import clopper_pearson_lower
from qrobust.smoothing.methods import radius_map_for
from qrobust.smoothing.randomized import randomized_clopper_pearson_lower

TRIALS = 20_000


def _se(alpha: float) -> float:
    return math.sqrt(alpha * (1 - alpha) / TRIALS)


@pytest.mark.parametrize(("n", "p", "alpha"), [(50, 0.8, 0.1), (50, 0.9, 0.1), (1000, 0.97, 0.1)])
def test_coverage_is_exactly_one_minus_alpha_where_clopper_pearson_is_conservative(n, p, alpha):
    rng = np.random.default_rng(0)
    votes = rng.binomial(n, p, TRIALS)
    randomized = randomized_clopper_pearson_lower(votes, n, alpha, rng)
    assert abs(np.mean(randomized >= p) - alpha) <= 3 * _se(alpha)
    counts = np.arange(n + 1)  # the ordinary bound's exact miss rate is well below alpha here
    assert np.sum(binom.pmf(counts, n, p) * (clopper_pearson_lower(counts, n, alpha) >= p)) < alpha - 3 * _se(alpha)


def test_never_below_clopper_pearson_nor_above_the_next_count():
    n, alpha = 200, 0.05
    counts = np.repeat(np.arange(n + 1), 20)
    bound = randomized_clopper_pearson_lower(counts, n, alpha, np.random.default_rng(1))
    assert np.all(bound >= clopper_pearson_lower(counts, n, alpha))
    upper = np.where(counts < n, clopper_pearson_lower(np.minimum(counts + 1, n), n, alpha), 1.0)
    assert np.all(bound <= upper)


def test_false_certification_rate_at_the_decision_boundary():
    """pA just below Phi(0.5 / sigma): certifying radius 0.5 from n = 1,000 votes is false."""
    sigma, alpha, n = 0.25, 0.1, 1000
    p = norm.cdf(0.5 / sigma) - 0.0005
    rng = np.random.default_rng(2)
    bound = randomized_clopper_pearson_lower(rng.binomial(n, p, TRIALS), n, alpha, rng)
    assert np.mean(sigma * norm.ppf(bound) >= 0.5) <= alpha + 3 * _se(alpha)


def test_the_coin_is_seeded_and_matters():
    first = randomized_clopper_pearson_lower(90, 100, 0.01, np.random.default_rng(3))
    assert first == randomized_clopper_pearson_lower(90, 100, 0.01, np.random.default_rng(3))
    others = {randomized_clopper_pearson_lower(90, 100, 0.01, np.random.default_rng(seed)) for seed in range(5)}
    assert len(others) == 5 and isinstance(first, float)


def test_all_votes_and_a_small_coin_give_one():
    """At k = n, pi(m) = U m^n <= U: when U <= alpha (probability alpha) every m is rejected and L = 1."""
    bounds = randomized_clopper_pearson_lower(np.full(2000, 10), 10, 0.2, np.random.default_rng(4))
    assert abs(np.mean(bounds == 1.0) - 0.2) < 0.05 and np.all(bounds >= 0.2 ** (1 / 10))


@pytest.mark.parametrize(("successes", "trials", "alpha"), [(5, 4, 0.1), (-1, 4, 0.1), (1, 0, 0.1), (1, 4, 1.0)])
def test_bad_arguments_raise(successes, trials, alpha):
    with pytest.raises(QRobustError):
        randomized_clopper_pearson_lower(successes, trials, alpha, np.random.default_rng(0))


def test_certify_with_a_randomized_bound_is_reproducible_and_never_smaller(linear_binary):
    """Same votes (same noise seed): the randomized bound and radius are >= the plain ones, the same for
    the same coin seed, and the radius is the method's radius map at the bound (FloatRS and lattice smoothing)."""
    for method, x in (
        (FloatRS(0.25), torch.full((1, 2, 2), 0.5)),
        (LatticeRS(0.25), torch.full((1, 2, 2), 100, dtype=torch.uint8)),
    ):
        smoothed = SmoothedClassifier(linear_binary, 2, method, batch_size=64)
        plain = smoothed.certify(x, n0=20, n=300, alpha=0.01, generator=torch.Generator().manual_seed(1))
        coins = [np.random.default_rng(seed) for seed in (7, 7, 8)]
        randomized = [
            smoothed.certify(x, n0=20, n=300, alpha=0.01, generator=torch.Generator().manual_seed(1), bound_rng=coin)
            for coin in coins
        ]
        assert not plain.abstained and all(np.array_equal(r.counts, plain.counts) for r in randomized)
        assert randomized[0].p_lower == randomized[1].p_lower != randomized[2].p_lower
        for certificate in randomized:
            assert certificate.p_lower >= plain.p_lower and certificate.radius >= plain.radius
            assert certificate.radius == radius_map_for(method).radius(certificate.p_lower)


def test_randomized_certificates_miss_exactly_alpha_through_the_smoothed_classifier(linear_binary):
    """End to end with known pA = Phi(0.2 / 0.25) = 0.788 (LinearBinary at margin 0.2), n = 30, alpha = 0.2:
    P[p_lower >= pA] is alpha exactly for the randomized bound (two-sided 99.8% binomial band over 500
    seeded inputs), while plain Clopper-Pearson misses far less (exactly 0.095 here)."""
    alpha, n, trials = 0.2, 30, 500
    smoothed = SmoothedClassifier(linear_binary, 2, FloatRS(0.25), batch_size=64)
    x = torch.tensor([0.5, 0.0, 0.0, 0.0]).reshape(1, 2, 2)
    p_a = float(norm.cdf(linear_binary.margin(x) / 0.25))
    assert p_a == pytest.approx(0.788, abs=1e-3)
    misses = sum(
        smoothed.certify(
            x, n0=5, n=n, alpha=alpha, generator=torch.Generator().manual_seed(t), bound_rng=np.random.default_rng(t)
        ).p_lower
        >= p_a
        for t in range(trials)
    )
    assert binom.ppf(0.001, trials, alpha) <= misses <= binom.ppf(0.999, trials, alpha)
    counts = np.arange(n + 1)
    plain = np.sum(binom.pmf(counts, n, p_a) * (clopper_pearson_lower(counts, n, alpha) >= p_a))
    assert plain == pytest.approx(0.095, abs=0.005)
