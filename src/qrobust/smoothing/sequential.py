"""Anytime-valid sequential certification: a confidence sequence for pA, read after every batch.

The confidence sequence (CS)
----------------------------
For votes X_1, X_2, ... iid Bernoulli(p) (X_i = 1: the i-th noisy sample voted for the guessed class)
with S successes and F = n - S failures after n samples, and a candidate value m in (0, 1), let

    M+_n(m) = integral over c in [0, 1] of  prod_i (1 + (c / m) (X_i - m))  dc
            = integral_m^1 q^S (1 - q)^F dq / (m^S (1 - m)^(F + 1))
            = B(S + 1, F + 1) * P[Beta(S + 1, F + 1) > m] / (m^S (1 - m)^(F + 1)).

Each integrand is the wealth of a gambler who bets the fraction c of the most he can afford on
"X_i = 1" at odds fair for p = m (Waudby-Smith & Ramdas, JRSS-B 2023); the uniform mixture over c is
Robbins' mixture of likelihood ratios q^S (1 - q)^F / (m^S (1 - m)^F) over alternatives q uniform on
[m, 1]. If p <= m, every bet has E[1 + (c / m)(X - m)] = 1 + (c / m)(p - m) <= 1, so M+_n(m) is a
nonnegative supermartingale with M+_0 = 1 and Ville's inequality gives P[exists n: M+_n(m) >= 1/alpha]
<= alpha. Each factor is non-increasing in m, hence so is M+_n, and

    L_n = inf {m : M+_n(m) < 1/alpha}  satisfies  P[exists n >= 1 : L_n > p] <= alpha:

with probability at least 1 - alpha, simultaneously for all n, pA >= L_n (and pA >= max_{k <= n} L_k).
The upper bound U_n is the mirror image (bets on failures, M-_n) at level ``alpha_refute``.

Why this construction: it is exact (a closed form through the regularised incomplete beta function,
no discretised bet grid, no approximation in the guarantee), monotone in m (so the bound is one
root-find, and a decision "is pA > m?" is one evaluation of M+_n(m), O(1) per batch), one-sided (no
power spent on the side that cannot create a false certificate), and its prior on alternatives adapts
to m: its density near q = m is 1 / (1 - m), which is what makes inputs with pA near 1, the common
case, stop early. A two-sided beta-binomial mixture would lose log(1 / P_prior[q > m]) nats of
evidence there; a discrete grid of bets loses log(grid size).

How alpha is accounted for
--------------------------
* Class selection: the class cA is guessed from n0 samples independent of the estimation samples
  (CERTIFY of Cohen et al.); conditionally on cA the CS is valid for pA = P[f(x + e) = cA], so no union
  over classes is needed.
* Radii: every decision is read off the same lower sequence ("r_j certified" means L_n >= p_needed(r_j)
  at some n, i.e. M+_n(p_needed(r_j)) >= 1/alpha). On the event {L_n <= pA for all n}, of probability
  >= 1 - alpha, every certified radius is truly certified, for all radii, at every time, whatever the
  stopping rule. No union over radii or over looks is needed.
* Certify / refute: only a false certification breaks soundness. Certification uses the lower side at
  level ``alpha``; refutation (stop drawing for r_j: U_n is below the least pA that would typically
  certify r_j within n_max samples) uses the upper side at level ``alpha_refute`` (default alpha).
  Refutations are a futility rule: an error there only reports a certifiable radius as not certified,
  as an abstention does. P[some false certificate] <= alpha, for each input.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import betainc, betaln

from qrobust.errors import QRobustError
from qrobust.smoothing.methods import RadiusMap

_BISECTIONS = 64  # halvings of [0, 1]: below the spacing of doubles
_NEWTON_STEPS = 16
_NEWTON_SLACK = 1e-12  # relative step back from the Newton root before verifying it


def log_evidence_lower(successes, trials, m):
    """log M+_n(m): evidence against pA <= m (module docstring); non-increasing in m, broadcasts."""
    s, f, m = _as_counts(successes, trials, m)
    with np.errstate(divide="ignore", invalid="ignore"):
        value = betaln(s + 1, f + 1) + np.log(betainc(f + 1, s + 1, 1.0 - m)) - s * np.log(m) - (f + 1) * np.log1p(-m)
    value = np.where(m >= 1.0, -np.inf, np.where(m <= 0.0, np.where(s > 0, np.inf, 0.0), value))
    return value[()] if value.ndim == 0 else value


def log_evidence_upper(successes, trials, m):
    """log M-_n(m): evidence against pA >= m (the mirror image); non-decreasing in m, broadcasts."""
    s, f, _ = _as_counts(successes, trials, m)
    return log_evidence_lower(f, s + f, 1.0 - np.asarray(m, dtype=float))


def cs_lower(successes, trials, alpha: float):
    """L_n: with probability >= 1 - alpha, pA >= L_n simultaneously for all n (any stopping rule).

    The crossing of the monotone M+_n with 1/alpha, found by safeguarded Newton steps in log m and
    returned only at a point where M+_n >= 1/alpha is verified (bisection where that fails), so the
    result is never above the exact bound, and below it by about 1e-12 relative. Arrays are evaluated
    at once.
    """
    _check_level("alpha", alpha)
    s, f, _ = _as_counts(successes, trials, 0.5)
    threshold = math.log(1.0 / alpha)
    lo, hi = np.zeros(s.shape), s / np.maximum(s + f, 1)  # M+_n(S / n) <= 1 < 1 / alpha
    x = np.clip(hi - np.sqrt(2 * threshold * (hi * (1 - hi) + 1 / (s + f + 1)) / (s + f + 1)), 0.25 * hi, hi)
    for _ in range(_NEWTON_STEPS):
        value, slope = _lower_gap(s, f, x, threshold)
        lo, hi = np.where(value >= 0, x, lo), np.where(value < 0, x, hi)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            step = x * np.exp(-value / (x * slope))  # Newton in log m: well conditioned for small bounds too
        x = np.where(np.isfinite(step) & (step >= lo) & (step <= hi), step, 0.5 * (lo + hi))
    candidate = x * (1.0 - _NEWTON_SLACK)
    verified = (s == 0) | (_lower_gap(s, f, candidate, threshold)[0] >= 0)
    bound = np.where(verified & (candidate > lo), candidate, lo)
    for _ in range(_BISECTIONS if not verified.all() else 0):
        mid = 0.5 * (lo + hi)
        rejected = _lower_gap(s, f, mid, threshold)[0] >= 0
        lo, hi = np.where(rejected, mid, lo), np.where(rejected, hi, mid)
    bound = np.where(verified, bound, lo)
    bound = np.where(s > 0, bound, 0.0)
    return bound[()] if bound.ndim == 0 else bound


def cs_upper(successes, trials, alpha: float):
    """U_n: with probability >= 1 - alpha, pA <= U_n simultaneously for all n (mirror of ``cs_lower``)."""
    s, f, _ = _as_counts(successes, trials, 0.5)
    value = 1.0 - np.asarray(cs_lower(f, s + f, alpha))
    return value[()] if value.ndim == 0 else value


@dataclass(frozen=True)
class SequentialResult:
    """The outcome of a sequential run on one input.

    ``radius`` (None: abstain) and ``p_lower`` hold with probability >= 1 - alpha; ``certified[j]`` /
    ``refuted[j]`` are the decisions on the requested ``radii[j]`` (both False: undecided at n_max).
    """

    radius: float | None
    votes: int
    samples: int
    p_lower: float
    p_upper: float
    certified: tuple[bool, ...] = ()
    refuted: tuple[bool, ...] = ()


DrawMany = Callable[[np.ndarray, int], np.ndarray]  # (indices of the inputs still running, k) -> votes


def certify_many(
    draw: DrawMany,
    inputs: int,
    radius_map: RadiusMap,
    radii: Sequence[float],
    alpha: float,
    n_max: int,
    batch: int = 256,
    alpha_refute: float | None = None,
) -> list[SequentialResult]:
    """Decide, for each of ``inputs`` inputs and each requested radius, whether it is certified.

    After every batch of ``batch`` samples, r_j is certified once M+_n(p_j) >= 1/alpha (p_j =
    p_needed(r_j)) and refuted once M-_n(q_j) >= 1/alpha_refute, i.e. U_n < q_j, where q_j > p_j is the
    least pA whose expected count pA * n_max would certify r_j by n_max (q_j = 1 when none would): more
    samples are then unlikely to certify r_j; a radius that even n_max votes of n_max cannot certify is
    refuted before the first sample (``planner.unreachable_radii``). An input stops when every radius is
    decided or at ``n_max`` samples. With probability >= 1 - alpha per input, no certified radius exceeds the radius
    of the true pA (module docstring). ``draw(indices, k)`` returns the votes for the guessed class
    among k new samples of each input in ``indices``.
    """
    _check_run(inputs, alpha, n_max, batch, alpha_refute)
    if not len(radii):
        raise QRobustError("radii must name at least one radius to decide")
    thresholds = np.array([radius_map.p_needed(r) for r in radii], dtype=float)
    lower, upper = math.log(1.0 / alpha), math.log(1.0 / (alpha_refute or alpha))
    futile = _reachable(thresholds, n_max, lower)
    votes, drawn = np.zeros(inputs, dtype=np.int64), np.zeros(inputs, dtype=np.int64)
    certified = np.zeros((inputs, len(radii)), dtype=bool)
    refuted = np.repeat((log_evidence_lower(n_max, n_max, thresholds) < lower)[None], inputs, axis=0)  # unreachable
    active = np.arange(inputs)
    while active.size:
        k = min(batch, n_max - int(drawn[active[0]]))
        votes[active] += _checked_votes(draw(active, k), active.size, k)
        drawn[active] += k
        open_ = ~(certified[active] | refuted[active])
        rows, cols = np.nonzero(open_)
        idx = active[rows]
        certified[idx, cols] = log_evidence_lower(votes[idx], drawn[idx], thresholds[cols]) >= lower
        refuted[idx, cols] = ~certified[idx, cols] & (log_evidence_upper(votes[idx], drawn[idx], futile[cols]) >= upper)
        still = (~(certified[active] | refuted[active])).any(axis=1) & (drawn[active] < n_max)
        active = active[still]
    p_lower, p_upper = cs_lower(votes, drawn, alpha), cs_upper(votes, drawn, alpha_refute or alpha)
    results = []
    for i in range(inputs):
        passed = thresholds[certified[i]]
        p_lo = max(float(p_lower[i]), float(passed.max(initial=0.0)))
        best = [r for r, c in zip(radii, certified[i], strict=True) if c]
        read = radius_map.radius(p_lo)
        if read is not None:
            best.append(read)
        p_hi = min(float(p_upper[i]), float(futile[refuted[i]].min(initial=1.0)))
        results.append(
            SequentialResult(
                max(best) if best else None,
                int(votes[i]),
                int(drawn[i]),
                p_lo,
                p_hi,
                tuple(bool(c) for c in certified[i]),
                tuple(bool(c) for c in refuted[i]),
            )
        )
    return results


def estimate_many(
    draw: DrawMany,
    inputs: int,
    radius_map: RadiusMap,
    tolerance: float,
    alpha: float,
    n_max: int,
    batch: int = 256,
    r_max: float = math.inf,
    alpha_refute: float | None = None,
) -> list[SequentialResult]:
    """Estimate the largest certifiable radius of each input to within ``tolerance``.

    After every batch, with L, U the running max / min of the CS bounds, an input stops when
    radius(U) is None (it abstains: pA <= 1/2 w.p. >= 1 - alpha_refute), when radius(U) - radius(L) <=
    ``tolerance``, when radius(L) >= ``r_max``, or at ``n_max``. The reported radius(L) holds with
    probability >= 1 - alpha; when stopped on the tolerance, the radius of the true pA exceeds it by at
    most ``tolerance`` with probability >= 1 - alpha_refute.
    """
    _check_run(inputs, alpha, n_max, batch, alpha_refute)
    if not tolerance > 0:
        raise QRobustError(f"tolerance must be > 0, got {tolerance!r}")
    votes, drawn = np.zeros(inputs, dtype=np.int64), np.zeros(inputs, dtype=np.int64)
    p_lower, p_upper = np.zeros(inputs), np.ones(inputs)
    active = np.arange(inputs)
    while active.size:
        k = min(batch, n_max - int(drawn[active[0]]))
        votes[active] += _checked_votes(draw(active, k), active.size, k)
        drawn[active] += k
        p_lower[active] = np.maximum(p_lower[active], cs_lower(votes[active], drawn[active], alpha))
        p_upper[active] = np.minimum(p_upper[active], cs_upper(votes[active], drawn[active], alpha_refute or alpha))
        keep = [
            drawn[i] < n_max and not _estimated(radius_map, p_lower[i], p_upper[i], tolerance, r_max) for i in active
        ]
        active = active[np.asarray(keep, dtype=bool)]
    return [
        SequentialResult(
            radius_map.radius(float(p_lower[i])), int(votes[i]), int(drawn[i]), float(p_lower[i]), float(p_upper[i])
        )
        for i in range(inputs)
    ]


def sequential_certify(
    draw: Callable[[int], int],
    radius_map: RadiusMap,
    radii: Sequence[float],
    alpha: float,
    n_max: int,
    batch: int = 256,
    alpha_refute: float | None = None,
) -> SequentialResult:
    """``certify_many`` for one input: ``draw(k)`` returns the guessed class's votes among k new samples."""
    return certify_many(_single(draw), 1, radius_map, radii, alpha, n_max, batch, alpha_refute)[0]


def sequential_estimate(
    draw: Callable[[int], int],
    radius_map: RadiusMap,
    tolerance: float,
    alpha: float,
    n_max: int,
    batch: int = 256,
    r_max: float = math.inf,
    alpha_refute: float | None = None,
) -> SequentialResult:
    """``estimate_many`` for one input: ``draw(k)`` returns the guessed class's votes among k new samples."""
    return estimate_many(_single(draw), 1, radius_map, tolerance, alpha, n_max, batch, r_max, alpha_refute)[0]


def _reachable(thresholds: np.ndarray, n_max: int, lower: float) -> np.ndarray:
    """For each threshold p_j, the least pA whose expected count pA * n_max makes M+_{n_max}(p_j) reach 1/alpha."""
    lo, hi = thresholds.copy(), np.ones_like(thresholds)
    for _ in range(_BISECTIONS):
        mid = 0.5 * (lo + hi)
        reached = log_evidence_lower(mid * n_max, n_max, thresholds) >= lower
        lo, hi = np.where(reached, lo, mid), np.where(reached, mid, hi)
    return hi


def _estimated(radius_map: RadiusMap, p_lower: float, p_upper: float, tolerance: float, r_max: float) -> bool:
    high = math.inf if p_upper >= 1.0 else radius_map.radius(float(p_upper))
    if high is None:
        return True
    low = radius_map.radius(float(p_lower))
    return low is not None and (high - low <= tolerance or low >= r_max)


def _lower_gap(s: np.ndarray, f: np.ndarray, m: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """log M+_n(m) - threshold and its derivative in m, for 0 < m < 1."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        log_beta = betaln(s + 1, f + 1)
        log_tail = np.log(betainc(f + 1, s + 1, 1.0 - m))
        log_m, log_rest = np.log(m), np.log1p(-m)
        value = log_beta + log_tail - s * log_m - (f + 1) * log_rest - threshold
        slope = -np.exp(s * log_m + f * log_rest - log_beta - log_tail) - s / m + (f + 1) / (1.0 - m)
    return value, slope


def _single(draw: Callable[[int], int]) -> DrawMany:
    return lambda indices, k: np.array([draw(k)])


def _checked_votes(votes, expected: int, k: int) -> np.ndarray:
    votes = np.asarray(votes)
    if votes.shape != (expected,) or (votes.size and (votes.min() < 0 or votes.max() > k)):
        raise QRobustError(f"draw must return {expected} vote counts in [0, {k}], got {votes!r}")
    return votes.astype(np.int64)


def _as_counts(successes, trials, m) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s, n = np.asarray(successes, dtype=float), np.asarray(trials, dtype=float)
    if np.any(s < 0) or np.any(s > n):
        raise QRobustError(f"successes must be in [0, trials], got {successes} of {trials}")
    return s, n - s, np.asarray(m, dtype=float)


def _check_level(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise QRobustError(f"{name} must be in (0, 1), got {value!r}")


def _check_run(inputs: int, alpha: float, n_max: int, batch: int, alpha_refute: float | None) -> None:
    _check_level("alpha", alpha)
    if alpha_refute is not None:
        _check_level("alpha_refute", alpha_refute)
    for name, value in (("inputs", inputs), ("n_max", n_max), ("batch", batch)):
        if int(value) != value or value < 1:
            raise QRobustError(f"{name} must be an integer >= 1, got {value!r}")
