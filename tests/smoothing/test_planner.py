"""Sample planner: answers match brute-force searches over n (scipy beta quantiles) and simulation."""

import math

import numpy as np
import pytest
from scipy.stats import beta, binom, norm

from qrobust.errors import QRobustError
from qrobust.smoothing.methods import FloatRS, GaussianRadius, IntRS
from qrobust.smoothing.planner import (
    fixed_n_any,
    fixed_n_at,
    largest_radius_fixed,
    largest_radius_sequential,
    plan,
    sequential_n_any,
    sequential_n_at,
    unreachable_radii,
)
from qrobust.smoothing.sequential import certify_many

CASES = [(0.25, 0.5, 0.001, 0.99), (0.5, 0.25, 0.01, 0.9), (0.25, 0.0, 0.05, 0.7)]  # sigma, radius, alpha, pA


def _brute_fixed_any(needed: float, alpha: float) -> int:
    return next(n for n in range(1, 100_000) if beta.ppf(alpha, n, 1) > needed)


def _brute_fixed_at(needed: float, alpha: float, p_a: float) -> int:
    for n in range(1, 5_000):
        counts = np.arange(1, n + 1)
        certifying = counts[beta.ppf(alpha, counts, n - counts + 1) > needed]
        if certifying.size and binom.sf(certifying[0] - 1, n, p_a) >= 0.5:
            return n
    raise AssertionError("no n below 5,000")


@pytest.mark.parametrize(("sigma", "radius", "alpha", "p_a"), CASES)
def test_fixed_n_matches_brute_force(sigma, radius, alpha, p_a):
    gauss = GaussianRadius(sigma)
    needed = gauss.p_needed(radius)
    assert fixed_n_any(gauss, radius, alpha) == _brute_fixed_any(needed, alpha)
    assert fixed_n_any(gauss, radius, alpha) == math.ceil(math.log(alpha) / math.log(needed))  # no tie here
    assert fixed_n_at(gauss, radius, alpha, p_a) == _brute_fixed_at(needed, alpha, p_a)


@pytest.mark.parametrize(("sigma", "radius", "alpha", "p_a"), CASES)
def test_sequential_any_matches_the_all_votes_mixture(sigma, radius, alpha, p_a):
    """With n votes of n the evidence is (1 / (n + 1)) * sum_{k <= n} p^-k, an independent closed form."""
    gauss = GaussianRadius(sigma)
    needed = gauss.p_needed(radius)
    brute = next(n for n in range(1, 100_000) if np.sum(needed ** -np.arange(n + 1.0)) / (n + 1) >= 1 / alpha)
    assert sequential_n_any(gauss, radius, alpha) == brute
    assert sequential_n_any(gauss, radius, alpha) >= fixed_n_any(gauss, radius, alpha)


def test_sequential_at_pa_is_the_median_stopping_time():
    gauss, radius, alpha, p_a = GaussianRadius(0.25), 0.5, 0.001, 0.99
    predicted = sequential_n_at(gauss, radius, alpha, p_a)
    rng = np.random.default_rng(0)
    results = certify_many(lambda i, k: rng.binomial(k, p_a, i.size), 400, gauss, (radius,), alpha, 20_000, batch=16)
    assert all(r.certified == (True,) for r in results)
    assert abs(np.median([r.samples for r in results]) / predicted - 1) < 0.15


def test_largest_radius_is_the_edge_of_the_plan():
    gauss, n, alpha = GaussianRadius(0.25), 100_000, 0.001
    fixed, sequential = largest_radius_fixed(gauss, n, alpha), largest_radius_sequential(gauss, n, alpha)
    assert 0.9 < sequential < fixed < 1.0
    assert fixed_n_any(gauss, fixed - 1e-9, alpha) <= n < fixed_n_any(gauss, fixed + 1e-6, alpha)
    assert sequential_n_any(gauss, sequential - 1e-9, alpha) <= n < sequential_n_any(gauss, sequential + 1e-6, alpha)
    assert largest_radius_fixed(gauss, 4, 0.05) is None  # 0.05^(1/4) = 0.47: every input abstains
    assert largest_radius_fixed(gauss, 5, 0.05) > 0  # 0.05^(1/5) = 0.55


def test_plan_and_unreachable_answers():
    gauss = GaussianRadius(0.25)
    full = plan(gauss, 0.5, 0.001, p_a=0.99)
    assert (full.fixed_any, full.sequential_any) == (
        fixed_n_any(gauss, 0.5, 0.001),
        sequential_n_any(gauss, 0.5, 0.001),
    )
    assert full.fixed_at == fixed_n_at(gauss, 0.5, 0.001, 0.99) and full.sequential_at > full.fixed_at
    assert plan(gauss, 0.5, 0.001).fixed_at is None
    assert fixed_n_at(gauss, 0.5, 0.001, 0.97) is None and sequential_n_at(gauss, 0.5, 0.001, 0.97) is None
    assert fixed_n_any(gauss, 3.0, 0.001) is None  # p_needed rounds to 1: beyond any n


@pytest.mark.parametrize("kwargs", [{"alpha": 0.0}, {"alpha": 1.0}, {"p_a": 0.0}, {"p_a": 1.5}, {"radius": -1.0}])
def test_bad_arguments_raise(kwargs):
    arguments = {"radius": 0.5, "alpha": 0.01, "p_a": 0.9} | kwargs
    with pytest.raises(QRobustError):
        plan(GaussianRadius(0.25), **arguments)


def test_unreachable_radii_are_those_above_the_largest_certifiable():
    """FloatRS at sigma 0.25, alpha 0.001: n votes of n give sigma * Phi^-1(alpha^(1/n)); n = 100,000 reaches
    0.953 (fixed) and n = 2,000 0.675, so the issue's 1.0 and 1.5 (and at 2,000 also 0.75) are out of reach;
    5 samples certify nothing, not even radius 0 (alpha^(1/5) < 1/2)."""
    method, alpha, radii = FloatRS(0.25), 0.001, (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)
    assert 0.25 * norm.ppf(alpha ** (1 / 100_000)) == pytest.approx(0.953, abs=1e-3)
    assert unreachable_radii(method, 100_000, alpha, radii) == (1.0, 1.5)
    assert unreachable_radii(method, 2_000, alpha, radii) == (0.75, 1.0, 1.5)
    assert unreachable_radii(method, 5, alpha, radii) == radii
    for n in (100, 2_000, 100_000):
        for sequential in (False, True):
            largest = (largest_radius_sequential if sequential else largest_radius_fixed)(
                GaussianRadius(0.25), n, alpha
            )
            assert unreachable_radii(method, n, alpha, radii, sequential) == tuple(r for r in radii if r > largest)
    # the sequential budget pays for peeking: it never reaches further than fixed n
    assert set(unreachable_radii(IntRS(0.5), 300, alpha, radii)) <= set(
        unreachable_radii(IntRS(0.5), 300, alpha, radii, True)
    )
