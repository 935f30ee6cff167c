"""Exact pmf of the discrete Gaussian N_Z(0, sigma_int^2) and the 64-bit inverse-CDF table built from it.

The table is what makes integer-only sampling possible for IntRS (Lin et al., "Integer-arithmetic-only
Certified Robustness for Quantized Neural Networks", ICCV 2021): it is computed once per sigma_int at
high precision with mpmath, after which a draw is one uniform 64-bit word and integer comparisons.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import mpmath
import numpy as np

MAX_SIGMA_INT = 2048.0
"""Largest supported sigma_int: keeps the support (|k| <= ~9.4 sigma_int) and x + noise for uint8 x in int16."""

GUIDE_BITS = 18
"""The guide table has one entry per value of the top GUIDE_BITS bits of the uniform word (512 KiB)."""

AMBIGUOUS = -(2**15)
"""Guide entry of a bucket that holds a threshold, so its top bits do not determine the sample."""

_DPS = 40  # decimal digits (~133 bits): far below the 2^-64 resolution of the thresholds
_TAIL_BITS = 64  # the support is cut where the mass outside it is < 2^-64


def check_sigma_int(sigma_int: float) -> float:
    """``sigma_int`` as a float, or ValueError if it is not finite and in (0, MAX_SIGMA_INT]."""
    if isinstance(sigma_int, bool) or not isinstance(sigma_int, (int, float)):
        raise ValueError(f"sigma_int must be a number in (0, {MAX_SIGMA_INT}], got {sigma_int!r}")
    if not (math.isfinite(sigma_int) and 0 < sigma_int <= MAX_SIGMA_INT):
        raise ValueError(f"sigma_int must be finite and in (0, {MAX_SIGMA_INT}], got {sigma_int!r}")
    return float(sigma_int)


@functools.cache
def _weights(sigma_int: float) -> tuple[tuple[mpmath.mpf, ...], mpmath.mpf]:
    """Unnormalised masses exp(-k^2 / (2 sigma_int^2)) for k = 0..M and the normaliser Z over all of Z.

    M is where a term falls below 10^-_DPS of the mode, so the neglected tail of Z is below the
    working precision.
    """
    with mpmath.workdps(_DPS):
        two_var = 2 * mpmath.mpf(sigma_int) ** 2
        last = math.ceil(sigma_int * math.sqrt(2 * _DPS * math.log(10))) + 1
        weights = tuple(mpmath.exp(-(mpmath.mpf(k) ** 2) / two_var) for k in range(last + 1))
        return weights, 2 * mpmath.fsum(weights) - weights[0]


def discrete_gaussian_pmf(k: np.ndarray | list[int], sigma_int: float) -> np.ndarray:
    """Exact P[X = k] for X ~ N_Z(0, sigma_int^2), evaluated at ~133 bits and rounded to float64."""
    sigma_int = check_sigma_int(sigma_int)
    _, total = _weights(sigma_int)
    with mpmath.workdps(_DPS):
        two_var = 2 * mpmath.mpf(sigma_int) ** 2
        masses = [mpmath.exp(-(mpmath.mpf(int(j)) ** 2) / two_var) / total for j in np.ravel(k)]
    return np.array([float(m) for m in masses], dtype=np.float64).reshape(np.shape(k))


@dataclass(frozen=True, eq=False)
class InverseCdfTable:
    """Inverse CDF of N_Z(0, sigma_int^2) on 64-bit uniforms, with a guide table over their top bits.

    A uniform word u in [0, 2^64) maps to ``searchsorted(thresholds, u, side="right") - offset``:
    thresholds[i] = round(2^64 * P[X <= i - offset]) for the support -offset..offset, the tails
    beyond it (mass < 2^-64) folded into the end points. ``guide[u >> (64 - GUIDE_BITS)]`` is that
    answer whenever the bucket of u holds no threshold, and AMBIGUOUS otherwise.
    """

    sigma_int: float
    offset: int  # K: the support is -K..K
    thresholds: np.ndarray  # (2K,) uint64, non-decreasing; the implicit last threshold is 2^64
    guide: np.ndarray  # (2^GUIDE_BITS,) int16
    tail_mass: float  # exact P[|X| > K], < 2^-64
    tv_distance: float  # total variation between the table's distribution and the exact one

    @property
    def ambiguous_fraction(self) -> float:
        """Probability that a draw needs a search rather than one guide lookup."""
        return float(np.mean(self.guide == AMBIGUOUS))


@functools.cache
def inverse_cdf_table(sigma_int: float) -> InverseCdfTable:
    """The (cached) table for ``sigma_int``; building it takes ~0.1 s at sigma_int = 255."""
    sigma_int = check_sigma_int(sigma_int)
    weights, total = _weights(sigma_int)
    with mpmath.workdps(_DPS):
        upper_tails = [mpmath.mpf(0)] * (len(weights) + 1)  # upper_tails[k] = sum_{j >= k} w_j
        for k in range(len(weights) - 1, -1, -1):
            upper_tails[k] = upper_tails[k + 1] + weights[k]
        bound = mpmath.mpf(2) ** -_TAIL_BITS
        offset = next(k for k in range(len(weights)) if 2 * upper_tails[k + 1] / total < bound)
        tail = 2 * upper_tails[offset + 1] / total
        pmf = [weights[abs(k)] / total for k in range(-offset, offset + 1)]  # (2K+1,)

        scale = mpmath.mpf(2) ** 64
        cdf = tail / 2
        thresholds = []
        for p in pmf[:-1]:
            cdf += p
            thresholds.append(min(int(mpmath.nint(cdf * scale)), 2**64 - 1))

        edges = [0, *thresholds, 2**64]
        l1 = sum(abs(mpmath.mpf(hi - lo) / scale - p) for lo, hi, p in zip(edges, edges[1:], pmf))
        tv_distance = (l1 + tail) / 2

    words = np.array(thresholds, dtype=np.uint64)
    return InverseCdfTable(
        sigma_int=sigma_int,
        offset=offset,
        thresholds=_read_only(words),
        guide=_read_only(_guide(words, offset)),
        tail_mass=float(tail),
        tv_distance=float(tv_distance),
    )


def _guide(thresholds: np.ndarray, offset: int) -> np.ndarray:
    """The sample for each bucket of top bits whose whole range maps to one value, else AMBIGUOUS."""
    width = 64 - GUIDE_BITS
    first = np.arange(2**GUIDE_BITS, dtype=np.uint64) << np.uint64(width)  # (2^b,) smallest u per bucket
    last = first | np.uint64(2**width - 1)  # largest u per bucket
    lo = np.searchsorted(thresholds, first, side="right")
    hi = np.searchsorted(thresholds, last, side="right")
    return np.where(lo == hi, lo - offset, AMBIGUOUS).astype(np.int16)


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array
