"""Sound l2 certificates for integer randomized smoothing (IntRS) on the integer lattice Z^d.

IntRS (Lin, Lou, Xiong & Shahabi, "Integer-arithmetic-only Certified Robustness for Quantized Neural
Networks", ICCV 2021) smooths a base classifier f of integer inputs x in Z^d (uint8 pixels) with
discrete Gaussian noise: g(x) = argmax_c P[f(x + n) = c], n ~ N_Z(0, sigma^2 I_d), each coordinate
with pmf proportional to exp(-k^2 / (2 sigma^2)) on k in Z. Here ``sigma`` is in lattice units
(sigma_int = 255 * sigma_[0,1] for 8-bit inputs) and perturbations delta are integer vectors.

What is proven here (derivations in docs/intrs-radius.md), for delta in Z^d, D = ||delta||_2^2 and
S = <n, delta>:

1. The worst case of P[f(x + delta + n) = c] over all base classifiers with P[f(x + n) = c] >= pA is
   attained by a randomised half-space {<n, delta> <= t} (Neyman-Pearson) and exceeds 1/2 iff
   pA > T(delta) := P[S < D] + P[S = D] / 2, where 1 - T(delta) = exp(-D / (2 sigma^2)) E[exp(-|S| / sigma^2)] / 2.
2. T(delta) <= Phi(||delta||_2 / sigma) for every d, sigma > 0 and integer delta: Cohen et al.'s radius
   sigma * Phi^-1(pA) is sound for IntRS. The exact (tight, dimension-free) radius enumerates every
   delta with D <= ``exact_up_to`` and uses this bound beyond.
3. The paper's radius sigma * Phi_NH^-1(pA), with Phi_NH^-1 looked up in the CDF of the 1-D discrete
   Gaussian, is not sound; ``paper_radius`` reproduces it for comparison only.

Computed probabilities are exact up to float rounding, which ``FLOAT_MARGIN`` absorbs, and to
truncations whose dropped mass is bounded and always counted against the certificate.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp, ndtr, ndtri

from qrobust.smoothing.confidence import check_alpha, check_count, clopper_pearson_lower

FLOAT_MARGIN = 1e-9  # relative margin against float rounding: taken off tails 1 - T, added to dropped mass
EXACT_UP_TO = 64  # default largest ||delta||^2 for which every direction is enumerated
_EXACT_WORK = 2e7  # at most (number of directions) x (frequency nodes) in one exact enumeration
_ALIAS_ERROR = 1e-30  # absolute bound on the quadrature error of E[exp(-|S| / sigma^2)]
_MAX_GRID_POINTS = 10_000_000  # padded lattice points one exact grid evaluation may enumerate


@dataclass(frozen=True)
class LatticePmf:
    """A truncated probability mass function on the consecutive integers offset, offset + 1, ...

    0 <= ``mass[i]`` <= P[X = offset + i] (equal up to float rounding except for truncated terms), and the
    total mass missing, summed over all integers, is at most ``dropped``.
    """

    offset: int
    mass: np.ndarray  # (length,) float64
    dropped: float


@dataclass(frozen=True)
class SmoothedGrid:
    """Smoothed class probabilities P[f(x + n) = c], n ~ N_Z(0, sigma^2 I_d), at every x of a lattice box.

    For the point x = lower + i, ``probabilities[i]`` (a (num_classes,) vector) satisfies
    probabilities[i][c] <= P[f(x + n) = c] <= probabilities[i][c] + dropped for every class c.
    """

    lower: tuple[int, ...]
    probabilities: np.ndarray  # (*box_shape, num_classes)
    dropped: float

    def at(self, point: Sequence[int]) -> np.ndarray:
        """The (num_classes,) lower bounds at the lattice point ``point``."""
        index = tuple(int(p) - low for p, low in zip(point, self.lower, strict=True))
        shape = self.probabilities.shape[:-1]
        if not all(0 <= i < size for i, size in zip(index, shape, strict=True)):
            upper = tuple(low + size - 1 for low, size in zip(self.lower, shape, strict=True))
            raise ValueError(f"point must lie in the box {self.lower}..{upper}, got {tuple(point)}")
        return self.probabilities[index]


def discrete_gaussian(sigma: float, tail: float = 1e-300) -> LatticePmf:
    """The pmf of N_Z(0, sigma^2), exp(-k^2 / (2 sigma^2)) / Z on k in Z, truncated to |k| <= M.

    M is the smallest integer whose dropped mass P[|n| > M] is provably <= ``tail`` (geometric bound on
    the Gaussian tail sum); ``dropped`` is that bound, raised by FLOAT_MARGIN against rounding.
    ``sigma`` is in lattice units.
    """
    check_sigma(sigma)
    check_tail(tail)
    log_z = _log_normaliser(sigma)
    m = max(0, math.floor(sigma * math.sqrt(2.0 * math.log(1.0 / tail))) - 2)
    while _log_tail_bound(m, sigma, log_z) > math.log(tail):
        m += 1
    k = np.arange(-m, m + 1)
    mass = np.exp(-(k * k) / (2.0 * sigma * sigma) - log_z)
    return LatticePmf(-m, mass, math.exp(_log_tail_bound(m, sigma, log_z)) * (1.0 + FLOAT_MARGIN))


def projection_pmf(delta: Sequence[int] | np.ndarray, sigma: float, tail: float = 1e-300) -> LatticePmf:
    """The law of S = <n, delta>, n ~ N_Z(0, sigma^2 I_d), by exact convolution of the 1-D laws.

    Each coordinate is truncated as in ``discrete_gaussian(sigma, tail)``; the returned ``dropped`` bounds
    the mass of the noise outside the truncation box. S is not a discrete Gaussian unless delta has at
    most one non-zero entry.
    """
    vector = check_delta(delta)
    noise = discrete_gaussian(sigma, tail)
    mass, offset = np.ones(1), 0
    nonzero = np.abs(vector[vector != 0])
    for step in nonzero:
        mass = _convolve_dilated(mass, noise.mass, int(step))
        offset += int(step) * noise.offset
    dropped = -math.expm1(len(nonzero) * math.log1p(-noise.dropped))
    return LatticePmf(offset, mass, dropped)


def critical_probability(delta: Sequence[int], sigma: float, tail: float = 1e-300) -> float:
    """T(delta) = P[S < D] + P[S = D] / 2 with S = <n, delta>, D = ||delta||_2^2, rounded up.

    Exact one-class certificate for one integer perturbation: if P[f(x + n) = c] >= pA > T(delta), then
    P[f(x + delta + n) = c] > 1/2 for every base classifier f; if pA <= T(delta), some (randomised) f has
    P[f(x + n) = c] = pA and P[f(x + delta + n) = c] <= 1/2. Computed from the identity
    1 - T(delta) = exp(-D / (2 sigma^2)) E[exp(-|S| / sigma^2)] / 2, so truncation only raises the result.
    """
    vector = check_delta(delta)
    law = projection_pmf(vector, sigma, tail)
    values = law.offset + np.arange(len(law.mass))
    expectation = float(np.dot(np.exp(-np.abs(values) / (sigma * sigma)), law.mass))
    tail_probability = 0.5 * math.exp(-_squared_norm(vector) / (2.0 * sigma * sigma)) * expectation
    return min(1.0, math.nextafter(1.0 - tail_probability * (1.0 - FLOAT_MARGIN), 2.0))


def worst_case_probability(p_a: float, delta: Sequence[int], sigma: float, tail: float = 1e-300) -> float:
    """The Neyman-Pearson bound: min P[f(x + delta + n) = c] over all (randomised) base classifiers f with
    P[f(x + n) = c] >= ``p_a``, for the integer perturbation ``delta`` (lattice units).

    The minimiser is the half-space {<z - x, delta> < t} plus a fraction gamma of the hyperplane
    {<z - x, delta> = t}, with P[S < t] + gamma P[S = t] = p_a for S = <n, delta>; the value is
    P[S + D < t] + gamma P[S + D = t], D = ||delta||_2^2. The returned number is a lower bound on it
    (it is computed for level p_a - dropped on the truncated law of S), tight up to ~``tail``.
    """
    check_probability("p_a", p_a)
    vector = check_delta(delta)
    law = projection_pmf(vector, sigma, tail)
    cdf = np.cumsum(law.mass)
    target = min(p_a - law.dropped, float(cdf[-1]))
    if target <= 0.0:
        return 0.0
    level = min(int(np.searchsorted(cdf, target, side="left")), len(cdf) - 1)
    below = float(cdf[level - 1]) if level > 0 else 0.0
    gamma = min(1.0, (target - below) / float(law.mass[level]))
    shifted = level - _squared_norm(vector)  # index of the value t - D in the law of S
    strictly_below = float(cdf[shifted - 1]) if shifted >= 1 else 0.0
    on_plane = float(law.mass[shifted]) if shifted >= 0 else 0.0
    return strictly_below + gamma * on_plane


def paper_radius(p_a: float, sigma: float) -> int:
    """sigma * Phi_NH^-1(p_a) of IntRS (Theorem 3.1, Algorithm 1, Theorem 3.2), in lattice units.

    Phi_NH(u) = P[n <= sigma u] for n ~ N_Z(0, sigma^2) and its inverse is read off the precomputed CDF
    table as Theorem 3.2 prescribes, i.e. the generalised inverse, so the radius is the integer
    min{m in Z : P[n <= m] >= p_a}. NOT a sound certificate (docs/intrs-radius.md gives
    counter-examples); use ``sound_squared_radius``. ``p_a`` must be in (1/2, 1), where Algorithm 1
    does not abstain.
    """
    if not 0.5 < p_a < 1.0:
        raise ValueError(f"p_a must be in (0.5, 1), got {p_a!r}")
    noise = discrete_gaussian(sigma)
    upper_tail = np.cumsum(noise.mass[::-1])[::-1]  # upper_tail[i] = P[n >= offset + i]
    above = np.append(upper_tail[1:], 0.0)  # above[i] = P[n > offset + i]
    return noise.offset + int(np.argmax(above <= 1.0 - p_a))  # 1 - p_a is exact for p_a >= 1/2


def sound_squared_radius(p_a: float, sigma: float, exact_up_to: int = EXACT_UP_TO) -> int | None:
    """The largest K such that P[f(x + n) = c] >= ``p_a`` implies P[f(x + delta + n) = c] > 1/2 (hence
    g(x + delta) = c) for every base classifier f, every dimension d and every delta in Z^d with
    ||delta||_2^2 <= K (lattice units); None when p_a <= 1/2 (no certificate, abstain).

    Tight (the largest such K over all d) when K < ``exact_up_to``: every direction with ||delta||^2 <=
    exact_up_to is enumerated, subject to a work budget that lowers the limit for large sigma. Beyond,
    the proven bound T(delta) <= Phi(||delta|| / sigma) is used, i.e. K is then at least the largest
    integer below (sigma * Phi^-1(p_a))^2, Cohen et al.'s radius squared.
    """
    check_probability("p_a", p_a)
    if p_a >= 1.0:
        raise ValueError("p_a must be < 1, got 1.0 (then f(x + n) = c almost surely and every radius is certified)")
    check_sigma(sigma)
    check_exact_up_to(exact_up_to)
    if p_a <= 0.5:
        return None
    tails = _tail_thresholds(sigma, 1.0 - p_a, exact_up_to)
    return int(np.count_nonzero(tails > 1.0 - p_a)) - 1


@dataclass(frozen=True)
class LatticeRadiusTable:
    """The certified squared l2 radius of IntRS for every count nA = 0..n, for an integer-only lookup.

    With pA_lower(nA) = clopper_pearson_lower(nA, n, alpha) (the one-sided (1 - alpha) Clopper-Pearson
    bound of ``qrobust.smoothing.confidence``) and cA the class guessed before drawing the n noisy samples
    (CERTIFY of Cohen et al.): with probability at least 1 - alpha over the samples, unless the table
    abstains (``squared_radius`` is None, i.e. pA_lower <= 1/2), g(x + delta) = cA for every delta in
    Z^d, any d, with ||delta||_2^2 <= squared_radius(nA) in lattice units. Entries are
    ``sound_squared_radius(pA_lower(nA), sigma, exact_up_to)``, built once, lazily, for all counts.

    Args:
        sigma: sigma_int, the noise scale in lattice units (0.25 in [0, 1] units is 63.75 for 8-bit inputs).
        n: number of noisy samples whose top-class count is looked up.
        alpha: failure probability of the confidence bound, in (0, 1).
        scale: lattice units per unit of the [0, 1] input scale (255 for uint8), for ``radius``.
        exact_up_to: largest squared radius for which every direction is enumerated.
    """

    sigma: float
    n: int
    alpha: float
    scale: float = 255.0
    exact_up_to: int = EXACT_UP_TO

    def __post_init__(self) -> None:
        check_sigma(self.sigma)
        check_count("n", self.n)
        check_alpha(self.alpha)
        if not (isinstance(self.scale, numbers.Real) and math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be a finite number > 0, got {self.scale!r}")
        check_exact_up_to(self.exact_up_to)

    @functools.cached_property
    def p_lower(self) -> np.ndarray:
        """(n + 1,) pA_lower for every count: clopper_pearson_lower(count, n, alpha), evaluated at once."""
        return clopper_pearson_lower(np.arange(self.n + 1), self.n, self.alpha)

    @functools.cached_property
    def _squared_radii(self) -> np.ndarray:
        """(n + 1,) int64 squared radius per count; -1 marks an abstention (never returned as such)."""
        p_lower = self.p_lower
        result = np.full(self.n + 1, -1, dtype=np.int64)
        certified = p_lower > 0.5
        if certified.any():
            tails = _tail_thresholds(self.sigma, 1.0 - float(p_lower[-1]), self.exact_up_to)
            # tails is non-increasing: the number of entries > 1 - pA is 1 + the certified squared radius
            result[certified] = np.searchsorted(-tails, -(1.0 - p_lower[certified]), side="left") - 1
        return result

    @property
    def min_count(self) -> int:
        """The smallest count that certifies (pA_lower > 1/2); n + 1 if none does."""
        certified = np.flatnonzero(self._squared_radii >= 0)
        return int(certified[0]) if certified.size else self.n + 1

    def squared_radius(self, count: int) -> int | None:
        """Certified ||delta||_2^2 in lattice units (an integer) for ``count`` votes of the top class, or None
        when the certificate abstains; one table lookup."""
        value = int(self._squared_radii[self._check_count(count)])
        return value if value >= 0 else None

    def radius(self, count: int) -> float | None:
        """Certified l2 radius in [0, 1] input units, sqrt(squared_radius(count)) / scale, or None."""
        squared = self.squared_radius(count)
        return None if squared is None else math.sqrt(squared) / self.scale

    def _check_count(self, count: int) -> int:
        if int(count) != count or not 0 <= count <= self.n:
            raise ValueError(f"count must be an integer in [0, n={self.n}], got {count!r}")
        return int(count)


def smoothed_grid(
    classify: Callable[[np.ndarray], np.ndarray],
    lower: Sequence[int],
    upper: Sequence[int],
    sigma: float,
    num_classes: int,
    tail: float = 1e-15,
) -> SmoothedGrid:
    """P[f(x + n) = c] for every lattice point x with lower <= x <= upper (inclusive, per coordinate), by
    enumerating the noise lattice: the base classifier is evaluated once on the box padded by M per side
    and its one-hot votes are convolved with the 1-D pmf along each axis (exact separable sums).

    The noise is truncated to |n_i| <= M as in ``discrete_gaussian(sigma, tail)``; the result's ``dropped``
    bounds the omitted mass, 1 - (1 - tail)^d. Meant for low dimensions (d = 1..4).

    Args:
        classify: maps an int64 array (m, d) of lattice points to (m,) integer labels in [0, num_classes).
        lower, upper: corners of the box of evaluated points, lattice units.
        sigma: noise scale in lattice units.
        num_classes: number of labels ``classify`` may return.
        tail: per-coordinate bound on the dropped noise mass.
    """
    lower_arr = np.asarray(lower, dtype=np.int64).reshape(-1)
    upper_arr = np.asarray(upper, dtype=np.int64).reshape(-1)
    if lower_arr.size == 0 or lower_arr.shape != upper_arr.shape or np.any(upper_arr < lower_arr):
        raise ValueError(f"lower and upper must be non-empty, of equal length and lower <= upper, got {lower}, {upper}")
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    noise = discrete_gaussian(sigma, tail)
    pad = -noise.offset
    padded_shape = tuple(int(s) for s in upper_arr - lower_arr + 1 + 2 * pad)
    if math.prod(padded_shape) > _MAX_GRID_POINTS:
        raise ValueError(
            f"the padded box has {math.prod(padded_shape)} lattice points, at most {_MAX_GRID_POINTS} allowed; "
            "shrink the box, the dimension or sigma"
        )
    axes = [np.arange(low - pad, high + pad + 1) for low, high in zip(lower_arr, upper_arr, strict=True)]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(axes))  # (m, d)
    labels = np.asarray(classify(points))
    if labels.shape != (len(points),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"classify must return ({len(points)},) integer labels, got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got values in [{labels.min()}, {labels.max()}]")
    votes = np.zeros((len(points), num_classes))
    votes[np.arange(len(points)), labels] = 1.0
    votes = votes.reshape(*padded_shape, num_classes)
    for axis in range(len(axes)):
        moved = np.moveaxis(votes, axis, 0)  # (padded length along axis, ...)
        length = moved.shape[0] - 2 * pad
        smoothed = np.zeros((length, *moved.shape[1:]))
        for k, weight in enumerate(noise.mass):  # the pmf is symmetric: correlation = convolution
            smoothed += weight * moved[k : k + length]
        votes = np.moveaxis(smoothed, 0, axis)
    dropped = -math.expm1(len(axes) * math.log1p(-noise.dropped))
    return SmoothedGrid(tuple(int(v) for v in lower_arr), votes, dropped)


def check_sigma(sigma: float) -> None:
    """Raise ValueError unless the noise scale ``sigma`` (lattice units) is a finite number > 0."""
    if not (isinstance(sigma, numbers.Real) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")


def check_tail(tail: float) -> None:
    """Raise ValueError unless the truncation bound ``tail`` is in (0, 0.5)."""
    if not (isinstance(tail, numbers.Real) and 0.0 < tail < 0.5):
        raise ValueError(f"tail must be in (0, 0.5), got {tail!r}")


def check_probability(name: str, value: float) -> None:
    """Raise ValueError unless ``value`` is a probability in [0, 1]."""
    if not (isinstance(value, numbers.Real) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


def check_exact_up_to(value: int) -> None:
    """Raise ValueError unless ``value`` is an integer >= 0."""
    if int(value) != value or value < 0:
        raise ValueError(f"exact_up_to must be an integer >= 0, got {value!r}")


def check_delta(delta: Sequence[int] | np.ndarray) -> np.ndarray:
    """``delta`` as a 1-D int64 array; raise ValueError unless it is a non-empty vector of integers."""
    array = np.asarray(delta)
    integral = np.issubdtype(array.dtype, np.integer) or (
        np.issubdtype(array.dtype, np.floating) and bool(np.all(array == np.round(array)))
    )
    if array.ndim != 1 or array.size == 0 or not integral:
        raise ValueError(f"delta must be a non-empty 1-D vector of integers, got {delta!r}")
    return array.astype(np.int64)


def _squared_norm(delta: np.ndarray) -> int:
    return sum(int(v) * int(v) for v in delta)


def _log_normaliser(sigma: float) -> float:
    """log sum_{k in Z} exp(-k^2 / (2 sigma^2)); omitted terms are below exp(-800) each."""
    k = np.arange(1, math.ceil(sigma * math.sqrt(1600.0)) + 2)
    return math.log1p(2.0 * float(np.sum(np.exp(-(k * k) / (2.0 * sigma * sigma)))))


def _log_tail_bound(m: int, sigma: float, log_z: float) -> float:
    """log of a bound on P[|n| > m]: sum_{k > m} exp(-k^2/2s^2) <= exp(-(m+1)^2/2s^2) / (1 - exp(-(2m+3)/2s^2))."""
    two_var = 2.0 * sigma * sigma
    return math.log(2.0) - (m + 1) ** 2 / two_var - log_z - math.log(-math.expm1(-(2 * m + 3) / two_var))


def _convolve_dilated(mass: np.ndarray, kernel: np.ndarray, step: int) -> np.ndarray:
    """The law of X + step * Y from the pmfs of X (``mass``) and Y (``kernel``), both on consecutive integers."""
    out = np.zeros(len(mass) + step * (len(kernel) - 1))
    for residue in range(min(step, len(mass))):
        out[residue::step] = np.convolve(mass[residue::step], kernel)
    return out


def _tail_thresholds(sigma: float, q_min: float, exact_up_to: int) -> np.ndarray:
    """x[K], K = 0..top: the squared radius K is certified iff 1 - pA < x[K]; x is non-increasing.

    x[0] = 1/2 (delta = 0) and x[K] is a lower bound on min over 1 <= ||delta||^2 <= K of 1 - T(delta): the
    exact minimum over all directions for K <= _exact_limit(sigma, exact_up_to), the larger of that and
    Phi(-sqrt(K) / sigma) (both are proven lower bounds), and Phi(-sqrt(K) / sigma) beyond. The array is
    long enough to decide every 1 - pA >= q_min (q_min in (0, 1/2)).
    """
    cohen_top = math.floor((sigma * float(-ndtri(q_min))) ** 2) + 1  # Phi(-sqrt(top)/sigma) < q_min
    exact_limit = _exact_limit(sigma, exact_up_to)
    top = max(cohen_top, exact_limit + 1)
    tails = ndtr(-np.sqrt(np.arange(top + 1)) / sigma) * (1.0 - FLOAT_MARGIN)
    if exact_limit >= 1:
        tails[: exact_limit + 1] = np.maximum(tails[: exact_limit + 1], _exact_tails(sigma, exact_limit))
    tails[0] = 0.5
    return np.minimum.accumulate(tails)


def _exact_limit(sigma: float, limit: int) -> int:
    """The largest D <= limit whose exact enumeration fits the work budget (0 if none)."""
    counts = _partition_counts(limit)
    cumulative = np.cumsum(counts)
    best = 0
    for d in range(1, limit + 1):
        if cumulative[d] * (_quadrature_nodes(sigma, d) // 2 + 1) > _EXACT_WORK:
            break
        best = d
    return best


@functools.lru_cache(maxsize=32)
def _exact_tails(sigma: float, d_max: int) -> np.ndarray:
    """x[D], D = 0..d_max: a lower bound on min over all delta with ||delta||^2 = D (any d) of 1 - T(delta).

    1 - T(delta) = exp(-D c / 2) E[exp(-c |S|)] / 2 with c = 1 / sigma^2 depends only on the multiset
    {|delta_i|} (a partition of D into squares). E[exp(-c|S|)] = (1/2pi) int_{-pi}^{pi} P(t) phi_S(t) dt
    with the Poisson kernel P(t) = sum_s exp(-c|s|) e^{ist} > 0 and phi_S(t) = prod_i phi(delta_i t) > 0,
    phi the characteristic function of N_Z(0, sigma^2) in its positive Poisson-summation form. The
    N-node trapezoid rule overestimates the integral by E[sum_{k != 0} exp(-c |S + kN|)], bounded by
    ``_alias_bound`` (sub-Gaussian tail of S); that bound and FLOAT_MARGIN are subtracted.
    """
    partitions, norms = _square_partitions(d_max)  # (P, A) multiplicities of the parts 1..A; (P,)
    c = 1.0 / (sigma * sigma)
    nodes = _quadrature_nodes(sigma, d_max)
    half = nodes // 2
    j = np.arange(half + 1)
    t = 2.0 * np.pi * j / nodes
    log_phi = _log_characteristic(sigma, t)  # (half + 1,) on [0, pi]
    parts = np.arange(1, partitions.shape[1] + 1)
    folded = (parts[:, None] * j[None, :]) % nodes
    log_phi_parts = log_phi[np.minimum(folded, nodes - folded)]  # (A, half + 1): log phi(a t_j)
    poisson = -np.expm1(-2.0 * c) / (np.expm1(-c) ** 2 + 4.0 * math.exp(-c) * np.sin(t / 2.0) ** 2)
    weights = np.full(half + 1, 2.0)
    weights[0] = weights[half] = 1.0
    weights *= poisson / nodes  # trapezoid over the N nodes folded onto [0, pi] by symmetry
    expectation = np.empty(len(partitions))
    chunk = max(1, 4_000_000 // (half + 1))
    for start in range(0, len(partitions), chunk):
        log_phi_s = partitions[start : start + chunk] @ log_phi_parts  # (chunk, half + 1)
        expectation[start : start + chunk] = np.exp(log_phi_s) @ weights
    lower = np.maximum(expectation * (1.0 - FLOAT_MARGIN) - _alias_bound(sigma, d_max, nodes), 0.0)
    tails_by_partition = 0.5 * np.exp(-norms * c / 2.0) * lower
    tails = np.full(d_max + 1, np.inf)
    np.minimum.at(tails, norms, tails_by_partition)
    tails[0] = 0.5
    return tails


def _quadrature_nodes(sigma: float, d_max: int) -> int:
    """An even number of trapezoid nodes N with _alias_bound(sigma, d_max, N) <= _ALIAS_ERROR."""
    c = 1.0 / (sigma * sigma)
    kernel_nodes = 2.0 * math.log(4.0 / _ALIAS_ERROR) / c
    tail_nodes = math.sqrt(8.0 * sigma * sigma * d_max * math.log(8.0 / _ALIAS_ERROR))
    nodes = max(8, math.ceil(max(kernel_nodes, tail_nodes)))
    return nodes + nodes % 2


def _alias_bound(sigma: float, d_max: int, nodes: int) -> float:
    """Bound on E[sum_{k != 0} exp(-c |S + k N|)] for S = <n, delta>, ||delta||^2 <= d_max, c = 1 / sigma^2.

    For |S| <= N/2 the sum is <= a = 2 exp(-cN/2) / (1 - exp(-cN)), otherwise <= 1 + a; and
    P[|S| > N/2] <= 2 exp(-N^2 / (8 sigma^2 d_max)) since N_Z(0, sigma^2) is sigma^2-sub-Gaussian
    (Canonne, Kamath & Steinke 2020), hence S is (sigma^2 d_max)-sub-Gaussian.
    """
    c = 1.0 / (sigma * sigma)
    a = 2.0 * math.exp(-c * nodes / 2.0) / -math.expm1(-c * nodes)
    return a + (1.0 + a) * 2.0 * math.exp(-(nodes * nodes) / (8.0 * sigma * sigma * d_max))


def _log_characteristic(sigma: float, t: np.ndarray) -> np.ndarray:
    """log E[exp(i t n)], n ~ N_Z(0, sigma^2), for t in [0, pi], via Poisson summation:
    phi(t) = sum_m exp(-sigma^2 (t - 2 pi m)^2 / 2) / sum_m exp(-2 pi^2 sigma^2 m^2) (positive terms;
    omitted terms are below exp(-745))."""
    reach = math.ceil((math.sqrt(1490.0) / (math.pi * sigma) + 1.0) / 2.0) + 1
    m = np.arange(-reach, reach + 1)
    numerator = logsumexp(-(sigma * sigma) * (t[:, None] - 2.0 * np.pi * m[None, :]) ** 2 / 2.0, axis=1)
    denominator = logsumexp(-2.0 * (np.pi * sigma * m) ** 2)
    return numerator - denominator


@functools.lru_cache(maxsize=8)
def _square_partitions(d_max: int) -> tuple[np.ndarray, np.ndarray]:
    """Every multiset of positive integers a with 1 <= sum a^2 <= d_max: a (P, isqrt(d_max)) float matrix of
    multiplicities (column a - 1 for the part a) and the (P,) sums of squares."""
    largest = math.isqrt(d_max)
    rows: list[list[int]] = []
    norms: list[int] = []
    counts = [0] * largest

    def extend(part: int, norm_so_far: int) -> None:
        if part == 0:
            if norm_so_far > 0:
                rows.append(counts.copy())
                norms.append(norm_so_far)
            return
        for multiplicity in range((d_max - norm_so_far) // (part * part) + 1):
            counts[part - 1] = multiplicity
            extend(part - 1, norm_so_far + multiplicity * part * part)
        counts[part - 1] = 0

    extend(largest, 0)
    return np.array(rows, dtype=float).reshape(len(rows), largest), np.array(norms)


def _partition_counts(d_max: int) -> np.ndarray:
    """counts[D] = number of partitions of D into positive squares, D = 0..d_max."""
    counts = np.zeros(d_max + 1, dtype=np.int64)
    counts[0] = 1
    for part in range(1, math.isqrt(d_max) + 1):
        for d in range(part * part, d_max + 1):
            counts[d] += counts[d - part * part]
    return counts
