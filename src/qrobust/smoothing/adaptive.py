"""Adaptive certification: CERTIFY of Cohen et al. whose estimation step stops once the answer is settled.

CERTIFY spends the same n samples on every input, although most are settled long before: a confident
input certifies the largest radius anyone asked for after a few thousand samples, and a hopeless one
cannot reach pA > 1/2. ``certify_adaptive`` draws the estimation samples in batches and stops each input
once the requested radii are decided, by one of two sequential tests:

* ``"cs"`` (default): the anytime-valid confidence sequence of ``qrobust.smoothing.sequential``, read
  after every batch of ``batch_size`` samples (``certify_many``).
* ``"union"``: the earlier schedule, kept for comparison: Clopper-Pearson bounds at level alpha / K at
  K geometric checkpoints (``SampleSchedule``, ``union_bound_radius``), valid by a union bound.

Both keep P[false certificate] <= alpha for every input whatever the data-dependent stopping rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from qrobust.errors import QRobustError
from qrobust.smoothing.confidence import check_alpha, check_count, clopper_pearson_lower
from qrobust.smoothing.core import Certificate, SmoothedClassifier
from qrobust.smoothing.methods import radius_map_for
from qrobust.smoothing.sequential import sequential_certify

SEQUENTIAL_TESTS = ("cs", "union")


def certify_adaptive(
    smoothed: SmoothedClassifier,
    x: torch.Tensor,
    *,
    n0: int,
    n_max: int,
    alpha: float,
    radii: Sequence[float],
    sequential: str = "cs",
    generator: torch.Generator | None = None,
) -> Certificate:
    """CERTIFY with a sequential estimation step that stops once every radius in ``radii`` is decided.

    Guess the top class from ``n0`` samples, then draw at most ``n_max`` estimation samples, checking
    after every batch (``"cs"``: every ``smoothed.batch_size`` samples; ``"union"``: at the checkpoints of
    ``SampleSchedule(n_max)``). With probability >= 1 - alpha the smoothed classifier returns ``label``
    on the whole l2 ball of the returned radius ([0, 1] pixel units). The radius is the largest requested
    radius decided as certified, or the radius of ``p_lower`` if larger. ``Certificate.samples`` is the
    number of estimation samples used. Non-finite logits vote for no class, as in
    ``SmoothedClassifier.certify``; when all n0 do, the certificate abstains without drawing.

    Raises:
        QRobustError: a bad argument (as ``SmoothedClassifier.certify``; ``radii`` empty or not finite
            and >= 0; ``sequential`` not one of ``SEQUENTIAL_TESTS``).
    """
    smoothed.method.check_image(x)
    check_count("n0", n0)
    check_count("n_max", n_max)
    check_alpha(alpha)
    check_radii(radii)
    check_sequential(sequential)
    estimation = smoothed.select(x, n0, n_max, generator)
    if estimation.guess is None:
        return smoothed.certificate(None, estimation.counts, alpha)
    if sequential == "cs":
        radius_map = radius_map_for(smoothed.method)
        result = sequential_certify(estimation.draw, radius_map, radii, alpha, n_max, smoothed.batch_size)
        radius, p_lower = result.radius, result.p_lower
    else:
        schedule = SampleSchedule(n_max)
        radius, p_lower, _ = union_bound_radius(estimation.draw, smoothed.method.radius, schedule, alpha, radii)
    label = None if radius is None else estimation.guess
    return Certificate(label, radius or 0.0, p_lower, estimation.counts, no_class=estimation.no_class)


def check_radii(radii: Sequence[float]) -> None:
    """Raise QRobustError unless ``radii`` is a non-empty sequence of finite radii >= 0."""
    if not len(radii) or not all(math.isfinite(r) and r >= 0 for r in radii):
        raise QRobustError(f"radii must be one or more finite numbers >= 0, got {tuple(radii)!r}")


def check_sequential(sequential: str) -> None:
    """Raise QRobustError unless ``sequential`` names a sequential test."""
    if sequential not in SEQUENTIAL_TESTS:
        raise QRobustError(f"sequential must be one of {', '.join(SEQUENTIAL_TESTS)}, got {sequential!r}")


@dataclass(frozen=True)
class SampleSchedule:
    """The checkpoints of the union-bound test: ``start``, ``start * growth``, ..., ``n_max``.

    Args:
        n_max: the most estimation samples an input may use (the last checkpoint).
        start: samples of the first round (default 1,000).
        growth: factor between consecutive checkpoints, > 1 (default 2).
    """

    n_max: int
    start: int = 1_000
    growth: float = 2.0

    def __post_init__(self) -> None:
        check_count("n_max", self.n_max)
        check_count("start", self.start)
        if not self.growth > 1:
            raise QRobustError(f"growth must be > 1, got {self.growth!r}")

    @property
    def checkpoints(self) -> tuple[int, ...]:
        """Increasing sample counts ending at ``n_max``."""
        points, n = [], min(self.start, self.n_max)
        while n < self.n_max:
            points.append(n)
            n = max(n + 1, math.ceil(n * self.growth))
        return (*points, self.n_max)


def union_bound_radius(
    draw: Callable[[int], int],
    radius: Callable[[int, int, float], float | None],
    schedule: SampleSchedule,
    alpha: float,
    radii: Sequence[float],
) -> tuple[float | None, float, int]:
    """The union-bound test on one input: (radius or None to abstain, p_lower, samples used).

    Args:
        draw: ``draw(k)`` draws k more noisy samples and returns how many voted for the guessed class.
        radius: the smoothing method's rule, ``radius(count, n, alpha)`` (None when pA <= 1/2).
        schedule: where the test may stop.
        alpha: overall failure probability; each checkpoint uses alpha / K.
        radii: the radii whose certification matters; the test stops at the first checkpoint where the
            lower-bound radius and the most optimistic radius reachable at ``n_max`` (from the upper
            confidence bound) lie between the same two of them.

    The radius and ``p_lower`` (Clopper-Pearson at level alpha / K) are those of the stopping
    checkpoint; with probability >= 1 - alpha they are sound whatever the stopping rule, since all K
    bounds hold at once.
    """
    check_alpha(alpha)
    points = schedule.checkpoints
    level = alpha / len(points)
    thresholds = np.sort(np.asarray(radii, dtype=float))
    votes = drawn = 0
    for n in points:
        votes += draw(n - drawn)
        drawn = n
        certified = radius(votes, n, level)
        # 1 - lower bound of the other class's share: the (1 - level) upper bound of pA.
        p_upper = 1.0 - clopper_pearson_lower(n - votes, n, level)
        reachable = radius(min(schedule.n_max, math.ceil(p_upper * schedule.n_max)), schedule.n_max, level)
        if _settled(certified, reachable, thresholds):
            break
    return certified, clopper_pearson_lower(votes, drawn, level), drawn


def _settled(certified: float | None, reachable: float | None, thresholds: np.ndarray) -> bool:
    """True when no requested radius lies in (certified, reachable]: more samples change nothing asked for."""
    low = -math.inf if certified is None else certified
    high = -math.inf if reachable is None else reachable
    if high <= low:
        return True
    return not bool(np.any((thresholds > low) & (thresholds <= high)))
