"""Confidence-sequence certification: exact evidence, valid under peeking (simulated votes with known pA), frugal."""

import math

import numpy as np
import pytest
from scipy.integrate import quad
from scipy.stats import norm

from qrobust.errors import QRobustError
from qrobust.smoothing import FloatRS, FloatRSQuant, IntRS, LatticeRS
from qrobust.smoothing.confidence import clopper_pearson_lower
from qrobust.smoothing.methods import GaussianRadius, LatticeRadius, radius_map_for
from qrobust.smoothing.sequential import (
    certify_many,
    cs_lower,
    cs_upper,
    estimate_many,
    log_evidence_lower,
    log_evidence_upper,
    sequential_certify,
    sequential_estimate,
)

SIGMA = 0.25
RADII = (0.0, 0.25, 0.5, 0.75)
GAUSS = GaussianRadius(SIGMA)
NEEDED = np.array([GAUSS.p_needed(r) for r in RADII])  # 0.5, 0.8413, 0.9772, 0.9987
TRIALS = 2000


def _votes(p: float, seed: int):
    rng = np.random.default_rng(seed)
    return lambda indices, k: rng.binomial(k, p, size=indices.size)


def _limit(alpha: float, trials: int = TRIALS) -> float:
    """alpha + 3 standard errors of a rate estimated from ``trials`` runs."""
    return alpha + 3 * math.sqrt(alpha * (1 - alpha) / trials)


def _false_rate(results, p: float) -> float:
    """Share of runs that certified some radius the true pA does not reach (p_needed(r) >= pA)."""
    return float(np.mean([any(c and need >= p for c, need in zip(r.certified, NEEDED)) for r in results]))


@pytest.mark.parametrize(
    ("successes", "trials", "m"), [(30, 40, 0.5), (95, 100, 0.9), (1000, 1000, 0.99), (3, 10, 0.2)]
)
def test_evidence_is_the_uniform_mixture_of_bets(successes, trials, m):
    failures = trials - successes

    def wealth(c, wins, losses, p):  # bet the fraction c of the most one can on the winning side
        return math.exp(wins * math.log1p(c / p - c) + losses * math.log1p(-c))

    lower = quad(wealth, 0, 1, args=(successes, failures, m), limit=200)[0]
    upper = quad(wealth, 0, 1, args=(failures, successes, 1 - m), limit=200)[0]
    assert log_evidence_lower(successes, trials, m) == pytest.approx(math.log(lower), rel=1e-9, abs=1e-9)
    assert log_evidence_upper(successes, trials, m) == pytest.approx(math.log(upper), rel=1e-9, abs=1e-9)


def test_bounds_are_the_crossings_of_the_evidence():
    alpha = 0.01
    votes, n = np.array([0, 1, 50, 90, 99, 100, 9_990, 100_000]), np.array([100] * 6 + [10_000, 100_000])
    lower, upper = cs_lower(votes, n, alpha), cs_upper(votes, n, alpha)
    assert np.all(lower <= votes / n) and np.all(upper >= votes / n) and lower[0] == 0 and upper[5] == 1
    inside = votes > 0
    assert np.all(log_evidence_lower(votes, n, lower)[inside] >= math.log(1 / alpha))  # never above the exact bound
    assert np.all(log_evidence_lower(votes, n, lower + 1e-9)[inside] < math.log(1 / alpha))  # and tight
    # all n votes: the CS pays a little over Clopper-Pearson's alpha^(1/n) for being valid at every n
    assert 1 > lower[-1] > 1 - 2 * math.log(1 / alpha) / 100_000
    assert lower[-1] < clopper_pearson_lower(100_000, 100_000, alpha)


# True pA just below the pA each radius needs: certifying that radius is false, and a sequential test is
# most tempted to do it. Votes are checked after every batch of 100, up to 10,000.
@pytest.mark.parametrize("p", [0.4995, NEEDED[1] - 0.002, NEEDED[2] - 0.001, NEEDED[3] - 0.0003])
def test_false_certification_rate_stays_below_alpha(p):
    alpha = 0.1
    results = certify_many(_votes(p, seed=1), TRIALS, GAUSS, RADII, alpha, n_max=10_000, batch=100)
    assert _false_rate(results, p) <= _limit(alpha)
    true_radius = SIGMA * norm.ppf(p) if p > 0.5 else -math.inf
    assert np.mean([r.radius is not None and r.radius > true_radius for r in results]) <= _limit(alpha)


def test_peeking_every_sample_keeps_validity():
    """Checking after every single vote (batch 1) is the most a stopping rule can look."""
    alpha, p = 0.1, NEEDED[1] - 0.004
    results = certify_many(_votes(p, seed=2), TRIALS, GAUSS, (0.25,), alpha, n_max=1_500, batch=1)
    assert np.mean([r.certified[0] for r in results]) <= _limit(alpha)


def test_naive_clopper_pearson_peeking_breaks_validity_but_the_cs_does_not():
    alpha, p, batch, n_max = 0.1, NEEDED[2] - 0.001, 100, 10_000
    rng = np.random.default_rng(3)
    votes, certified = np.zeros(TRIALS, dtype=np.int64), np.zeros(TRIALS, dtype=bool)
    for n in range(batch, n_max + 1, batch):  # certify r = 0.5 at the first look where CP(alpha) allows it
        votes += rng.binomial(batch, p, TRIALS)
        certified |= clopper_pearson_lower(votes, n, alpha) >= NEEDED[2]
    assert certified.mean() > 2 * _limit(alpha)
    results = certify_many(_votes(p, seed=3), TRIALS, GAUSS, (0.5,), alpha, n_max=n_max, batch=batch)
    assert np.mean([r.certified[0] for r in results]) <= _limit(alpha)


def test_sample_efficiency_at_high_pa():
    """pA = 0.99 at sigma 0.25: 0, 0.25 and 0.5 certified, 0.75 refuted, on a small share of n = 100,000."""
    results = certify_many(_votes(0.99, seed=4), 500, GAUSS, RADII, alpha=0.001, n_max=100_000)
    assert np.mean([r.samples for r in results]) <= 0.05 * 100_000
    assert np.mean([r.certified == (True, True, True, False) and r.refuted[3] for r in results]) >= 0.99


def test_decisions_are_consistent():
    results = certify_many(_votes(0.9, seed=5), 200, GAUSS, RADII, alpha=0.01, n_max=5_000, batch=64)
    for r in results:
        certified, refuted = np.array(r.certified), np.array(r.refuted)
        assert not np.any(certified & refuted)
        assert np.all(np.diff(certified.astype(int)) <= 0) and np.all(np.diff(refuted.astype(int)) >= 0)
        assert r.p_lower <= r.votes / r.samples <= r.p_upper
        if certified.any():
            assert r.radius >= max(np.array(RADII)[certified])
        assert r.samples == 5_000 or (certified | refuted).all()


def test_estimate_is_valid_and_precise():
    alpha, p, tolerance = 0.1, 0.98, 0.05
    true_radius = SIGMA * norm.ppf(p)
    results = estimate_many(_votes(p, seed=6), TRIALS, GAUSS, tolerance, alpha, n_max=50_000, batch=256)
    assert np.mean([r.radius > true_radius for r in results]) <= _limit(alpha)
    for r in results:
        assert r.samples < 50_000  # all reach the precision
        assert GAUSS.radius(r.p_upper) - r.radius <= tolerance


def test_estimate_stops_at_r_max_and_on_abstention():
    capped = estimate_many(_votes(1.0, seed=7), 1, GAUSS, 0.01, 0.001, n_max=100_000, r_max=0.5)[0]
    assert capped.radius >= 0.5 and capped.samples < 10_000
    hopeless = estimate_many(_votes(0.3, seed=7), 1, GAUSS, 0.01, 0.001, n_max=100_000)[0]
    assert hopeless.radius is None and hopeless.p_upper <= 0.5 and hopeless.samples < 1_000


def test_single_input_api():
    rng = np.random.default_rng(8)
    result = sequential_certify(lambda k: int(rng.binomial(k, 0.99)), GAUSS, RADII, 0.001, 100_000)
    assert result.certified == (True, True, True, False) and result.samples % 256 == 0
    estimate = sequential_estimate(lambda k: int(rng.binomial(k, 0.95)), GAUSS, 0.1, 0.001, 100_000)
    assert estimate.radius <= SIGMA * norm.ppf(0.95) and estimate.votes <= estimate.samples < 100_000


def test_lattice_radius_map():
    lattice = LatticeRadius(SIGMA)
    for r in (0.0, 0.25, 0.5):
        p = lattice.p_needed(r)
        assert lattice.radius(p) >= r and (lattice.radius(p - 1e-9) or -1.0) < r
    p = 0.99  # the sound lattice radius is at least Cohen et al.'s, rounded down on the integer lattice
    cohen = SIGMA * 255 * norm.ppf(p)
    assert lattice.radius(p) >= math.sqrt(math.floor(cohen**2)) / 255 and lattice.radius(1.0) == math.inf


@pytest.mark.parametrize(
    "kwargs",
    [{"alpha": 0.0}, {"alpha_refute": 1.0}, {"n_max": 0}, {"batch": 1.5}, {"radii": ()}, {"radii": (-0.1,)}],
)
def test_bad_arguments_raise(kwargs):
    arguments = {"radii": RADII, "alpha": 0.01, "n_max": 100, "batch": 10} | kwargs
    with pytest.raises(QRobustError):
        certify_many(_votes(0.9, 0), 2, GAUSS, **arguments)


def test_bad_votes_raise():
    with pytest.raises(QRobustError, match="vote counts"):
        sequential_certify(lambda k: k + 1, GAUSS, RADII, 0.01, 100)


def test_futile_radii_are_refuted_early():
    """A radius no input can certify within n_max is dropped at the first failing vote; one the true pA
    cannot reach within n_max is dropped long before n_max."""
    unreachable = certify_many(_votes(0.99, seed=9), 50, GAUSS, (0.0, 2.0), 0.001, n_max=10_000, batch=256)
    assert all(r.certified == (True, False) and r.refuted[1] and r.samples <= 512 for r in unreachable)
    sure = certify_many(_votes(1.0, seed=9), 5, GAUSS, (0.0, 2.0), 0.001, n_max=10_000, batch=256)
    assert all(r.certified == (True, False) and r.refuted[1] and r.samples == 256 for r in sure)  # pA = 1 too
    far = certify_many(_votes(0.995, seed=9), 200, GAUSS, (0.75,), 0.001, n_max=100_000, batch=256)
    assert all(r.refuted == (True,) for r in far) and np.mean([r.samples for r in far]) < 10_000


def test_radius_maps_agree_with_the_methods():
    """Each method's radius(count, n, alpha) is its radius map at the Clopper-Pearson bound."""
    n, alpha = 1000, 0.001
    for method in (FloatRS(0.25), FloatRSQuant(0.5), IntRS(0.25), LatticeRS(0.5)):
        radius_map = radius_map_for(method)
        for count in (400, 600, 800, 950, 990, 999, 1000):
            expected = method.radius(count, n, alpha)
            got = radius_map.radius(clopper_pearson_lower(count, n, alpha))
            assert (got is None) == (expected is None) and (got is None or got == pytest.approx(expected, abs=1e-12))
    with pytest.raises(QRobustError):
        radius_map_for(object())


def test_bad_counts_raise():
    with pytest.raises(QRobustError, match="successes"):
        cs_lower(11, 10, 0.01)
    with pytest.raises(QRobustError, match="successes"):
        log_evidence_upper(-1, 10, 0.5)
