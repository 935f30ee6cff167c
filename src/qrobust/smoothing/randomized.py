"""Randomized Clopper-Pearson: the exact one-sided binomial lower bound with coverage exactly 1 - alpha.

The Clopper-Pearson bound is conservative because the count is discrete: P[pA >= CP] is >= 1 - alpha
and often well above. Randomizing at the observed count removes the slack (Voracek, NeurIPS 2024,
following the randomized UMP test): with U ~ U(0, 1) drawn independently of the votes, the p-value of
H0: pA <= m,

    pi(m) = P_m[X > k] + U * P_m[X = k],      X ~ Binomial(n, m),

is exactly U(0, 1) under pA = m and increases with m, so

    L = sup {m in [0, 1] : pi(m) <= alpha}   (0 when the set is empty)

satisfies P[L >= pA] = alpha exactly, over the votes AND U jointly. L lies between the CP bound of k
(U = 1) and that of k + 1 (U = 0), so it is never below the ordinary bound and certifies larger radii.

Why a user might not want it: the certificate now depends on an extra coin. The guarantee is
exactly 1 - alpha averaged over U, but for the U actually drawn the bound can be anything between the
two CP values; two reruns with different coins on the same votes give different radii; and with
probability alpha at k = n the bound is 1 (an unbounded radius), an outcome that is part of the
allowed alpha. Record the seed so a certificate can be reproduced.
"""

from __future__ import annotations

import numpy as np
from scipy.special import betainc, gammaln, xlog1py, xlogy

from qrobust.errors import QRobustError
from qrobust.smoothing.confidence import clopper_pearson_lower

_BISECTIONS = 64


def randomized_clopper_pearson_lower(successes, trials: int, alpha: float, rng: np.random.Generator):
    """The randomized (1 - alpha) lower bound L of the module docstring, one U(0, 1) draw from ``rng``
    per count: P[L < pA] = 1 - alpha exactly over the votes and the draws; L >= the Clopper-Pearson bound.

    ``successes`` may be an int (returns a float) or an integer array (returns an array, one draw each).
    The bisection returns a point where pi <= alpha, never above the exact L.
    """
    if not 0.0 < alpha < 1.0:
        raise QRobustError(f"alpha must be in (0, 1), got {alpha!r}")
    if int(trials) != trials or trials < 1:
        raise QRobustError(f"trials must be an integer >= 1, got {trials!r}")
    k = np.asarray(successes)
    if k.size and (k.min() < 0 or k.max() > trials):
        raise QRobustError(f"successes must be in [0, trials={trials}], got {successes}")
    u = rng.random(k.shape)
    lo = np.asarray(clopper_pearson_lower(k, trials, alpha), dtype=float)  # pi(lo) <= alpha (= when k >= 1)
    hi = np.where(k < trials, clopper_pearson_lower(np.minimum(k + 1, trials), trials, alpha), 1.0)  # pi(hi) >= alpha
    for _ in range(_BISECTIONS):
        mid = 0.5 * (lo + hi)
        below = _p_value(k, trials, mid, u) <= alpha
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    lo = np.where((k == trials) & (u <= alpha), 1.0, lo)  # pi(m) = U m^n <= alpha on all of [0, 1]
    return float(lo) if lo.ndim == 0 else lo


def _p_value(k: np.ndarray, n: int, m: np.ndarray, u: np.ndarray) -> np.ndarray:
    """pi(m) = P_m[X > k] + u P_m[X = k] for X ~ Binomial(n, m)."""
    above = np.where(k < n, betainc(np.minimum(k + 1, n), np.maximum(n - k, 1), m), 0.0)
    log_pmf = gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1) + xlogy(k, m) + xlog1py(n - k, -m)
    return above + u * np.exp(log_pmf)
