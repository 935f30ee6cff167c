"""Sample planner: how many noisy samples certifying a radius takes, with fixed n and sequentially.

Definitions (r the radius, p* = radius_map.p_needed(r), alpha the failure probability):

* fixed n, any input: the smallest n at which n votes of n certify r, i.e. the Clopper-Pearson bound
  alpha^(1/n) exceeds p*: n = ceil(log(alpha) / log(p*)) up to the strictness at equality. No input,
  however confident, certifies r with fewer samples.
* fixed n, at pA: the smallest n at which CERTIFY certifies r with probability >= 1/2 when the true
  top-class probability is pA (the count is Binomial(n, pA); certification needs count >= k*(n), the
  least count whose Clopper-Pearson bound exceeds p*). Certification probability is not monotone in
  n (the count is discrete), so every n is scanned.
* sequential, any input: the smallest n at which n votes of n make the confidence-sequence evidence
  M+_n(p*) reach 1/alpha (``qrobust.smoothing.sequential``), i.e. the fewest samples the sequential
  certifier can stop at with r certified.
* sequential, at pA: the smallest n at which the evidence at the expected count S = pA * n reaches
  1/alpha: the stopping time of the typical path, close to the median stopping time of the certifier
  (checked by simulation in the tests); the certifier itself stops at the next multiple of its batch.

``largest_radius_fixed`` / ``largest_radius_sequential`` give the largest radius any input can certify
with a budget of n samples, and ``unreachable_radii`` the requested radii above it, so a run can warn
when they are out of reach.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import betainc, ndtri

from qrobust.errors import QRobustError
from qrobust.smoothing.confidence import clopper_pearson_lower
from qrobust.smoothing.methods import SmoothingMethod, radius_map_for
from qrobust.smoothing.sequential import RadiusMap, cs_lower, log_evidence_lower

N_LIMIT = 10_000_000  # the planner does not look beyond this many samples
_CHUNK = 4096  # first block of n scanned at once; blocks double


@dataclass(frozen=True)
class Plan:
    """Samples needed to certify ``radius`` at level ``alpha``; None: not within ``N_LIMIT`` (or never)."""

    radius: float
    alpha: float
    p_needed: float
    fixed_any: int | None
    sequential_any: int | None
    p_a: float | None = None
    fixed_at: int | None = None
    sequential_at: int | None = None


def plan(radius_map: RadiusMap, radius: float, alpha: float, p_a: float | None = None) -> Plan:
    """All four numbers of the module docstring (the ``at`` ones only when ``p_a`` is given)."""
    _check(alpha, p_a)
    needed = radius_map.p_needed(radius)
    if p_a is None:
        return Plan(
            radius, alpha, needed, fixed_n_any(radius_map, radius, alpha), sequential_n_any(radius_map, radius, alpha)
        )
    return Plan(
        radius,
        alpha,
        needed,
        fixed_n_any(radius_map, radius, alpha),
        sequential_n_any(radius_map, radius, alpha),
        p_a,
        fixed_n_at(radius_map, radius, alpha, p_a),
        sequential_n_at(radius_map, radius, alpha, p_a),
    )


def fixed_n_any(radius_map: RadiusMap, radius: float, alpha: float) -> int | None:
    """The smallest n with clopper_pearson_lower(n, n, alpha) = alpha^(1/n) > p_needed(radius)."""
    _check(alpha)
    needed = radius_map.p_needed(radius)
    return _first_monotone(lambda n: clopper_pearson_lower(n, n, alpha) > needed)


def sequential_n_any(radius_map: RadiusMap, radius: float, alpha: float) -> int | None:
    """The smallest n with log M+_n(p_needed(radius)) >= log(1/alpha) after n votes of n (increasing in n)."""
    _check(alpha)
    needed, threshold = radius_map.p_needed(radius), math.log(1.0 / alpha)
    return _first_monotone(lambda n: log_evidence_lower(n, n, needed) >= threshold)


def fixed_n_at(radius_map: RadiusMap, radius: float, alpha: float, p_a: float) -> int | None:
    """The smallest n at which fixed-n certification of ``radius`` succeeds with probability >= 1/2 at pA."""
    _check(alpha, p_a)
    needed = radius_map.p_needed(radius)
    if p_a <= needed:
        return None  # the probability tends to 0 (or stays <= 1/2 at equality)
    start = fixed_n_any(radius_map, radius, alpha)
    return (
        None
        if start is None
        else _first_scanned(lambda n: _certification_probability(n, alpha, needed, p_a) >= 0.5, start)
    )


def sequential_n_at(radius_map: RadiusMap, radius: float, alpha: float, p_a: float) -> int | None:
    """The smallest n with log M+_n(p_needed(radius)) >= log(1/alpha) at the expected count pA * n."""
    _check(alpha, p_a)
    needed, threshold = radius_map.p_needed(radius), math.log(1.0 / alpha)
    if p_a <= needed:
        return None
    start = sequential_n_any(radius_map, radius, alpha)
    return (
        None if start is None else _first_scanned(lambda n: log_evidence_lower(p_a * n, n, needed) >= threshold, start)
    )


def largest_radius_fixed(radius_map: RadiusMap, n: int, alpha: float) -> float | None:
    """The largest radius any input can certify from n samples: the radius of alpha^(1/n) (None: none)."""
    _check(alpha)
    _check_n(n)
    return radius_map.radius(float(clopper_pearson_lower(n, n, alpha)))


def largest_radius_sequential(radius_map: RadiusMap, n_max: int, alpha: float) -> float | None:
    """The largest radius the sequential certifier can certify within n_max samples: that of L at n_max votes of n_max."""
    _check(alpha)
    _check_n(n_max)
    return radius_map.radius(float(cs_lower(n_max, n_max, alpha)))


def unreachable_radii(
    method: SmoothingMethod, n: int, alpha: float, radii: Sequence[float], sequential: bool = False
) -> tuple[float, ...]:
    """The radii of ``radii`` that no input can certify with ``method`` from ``n`` estimation samples at
    level ``alpha``: those above ``largest_radius_fixed`` (``sequential``: ``largest_radius_sequential``,
    n the most samples per input), all of them when even n votes of n abstain. For a warning before a
    run, and to mark table columns that can only read 0."""
    radius_map = radius_map_for(method)
    largest = (
        largest_radius_sequential(radius_map, n, alpha) if sequential else largest_radius_fixed(radius_map, n, alpha)
    )
    return tuple(r for r in radii if largest is None or r > largest)


def _certification_probability(n: np.ndarray, alpha: float, needed: float, p_a: float) -> np.ndarray:
    """P[Binomial(n, pA) >= k*(n)], k*(n) the least count whose Clopper-Pearson bound exceeds ``needed``.

    CP(k, n) > p  <=>  P_p[Binomial(n, p) >= k] = I_p(k, n - k + 1) < alpha; k* starts at the normal
    approximation and moves one count at a time until it is exact.
    """
    k = np.clip(np.ceil(n * needed + ndtri(1 - alpha) * np.sqrt(n * needed * (1 - needed))), 1, n + 1).astype(np.int64)
    while True:
        down = (k >= 2) & (_upper_tail(k - 1, n, needed) < alpha)
        up = (k <= n) & ~(_upper_tail(k, n, needed) < alpha)
        if not (down.any() or up.any()):
            return _upper_tail(k, n, p_a)
        k = k - down + up


def _upper_tail(k: np.ndarray, n: np.ndarray, p: float) -> np.ndarray:
    """P_p[Binomial(n, p) >= k] for 1 <= k <= n + 1 (0 at k = n + 1)."""
    inside = k <= n
    return np.where(inside, betainc(np.minimum(k, n), np.where(inside, n - k + 1, 1), p), 0.0)


def _first_monotone(holds: Callable[[int], bool]) -> int | None:
    """The smallest n in [1, N_LIMIT] where the non-decreasing predicate ``holds`` is true, or None."""
    if not holds(N_LIMIT):
        return None
    lo, hi = 0, 1  # holds(lo) is false (or lo = 0)
    while not holds(hi):
        lo, hi = hi, min(2 * hi, N_LIMIT)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if holds(mid) else (mid, hi)
    return hi


def _first_scanned(holds: Callable[[np.ndarray], np.ndarray], start: int) -> int | None:
    """The smallest n in [start, N_LIMIT] where ``holds`` (vectorised over n) is true, or None."""
    lo, size = start, _CHUNK
    while lo <= N_LIMIT:
        n = np.arange(lo, min(lo + size, N_LIMIT + 1))
        hits = np.flatnonzero(holds(n))
        if hits.size:
            return int(n[hits[0]])
        lo, size = lo + size, 2 * size
    return None


def _check(alpha: float, p_a: float | None = None) -> None:
    if not 0.0 < alpha < 1.0:
        raise QRobustError(f"alpha must be in (0, 1), got {alpha!r}")
    if p_a is not None and not 0.0 < p_a <= 1.0:
        raise QRobustError(f"p_a must be in (0, 1], got {p_a!r}")


def _check_n(n: int) -> None:
    if int(n) != n or n < 1:
        raise QRobustError(f"n must be an integer >= 1, got {n!r}")
