"""Randomized Clopper-Pearson: coverage exactly 1 - alpha (simulated, known pA), never below the ordinary bound."""

import math

import numpy as np
import pytest
from scipy.stats import binom, norm

from qrobust.errors import QRobustError
from qrobust.smoothing.confidence import clopper_pearson_lower
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
