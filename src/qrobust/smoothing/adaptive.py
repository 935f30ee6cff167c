"""Adaptive (sequential) certification: draw noisy samples in rounds and stop once the answer is settled.

CERTIFY of Cohen et al. spends the same n samples on every input, although most inputs are settled
long before: a confident input certifies the largest radius anyone asked for after a few thousand
samples, and a hopeless one cannot reach pA > 1/2. Here the n estimation samples are drawn in rounds
n_1 < n_2 < ... < n_K = n_max (a geometric schedule) and, after each round, the Clopper-Pearson bounds
at level alpha / K decide whether more samples could still change which requested radii are
certified. Every round's lower bound holds simultaneously with probability >= 1 - alpha (a union bound
over the K checkpoints), so stopping at any of them, by any rule, keeps P[false certificate] <= alpha.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from qrobust.smoothing.confidence import check_alpha, check_count, clopper_pearson_lower
from qrobust.smoothing.core import Certificate, SmoothedClassifier


@dataclass(frozen=True)
class SampleSchedule:
    """The checkpoints at which a sequential test may stop: ``start``, ``start * growth``, ..., ``n_max``.

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
            raise ValueError(f"growth must be > 1, got {self.growth!r}")

    @property
    def checkpoints(self) -> tuple[int, ...]:
        """Increasing sample counts ending at ``n_max``."""
        points, n = [], min(self.start, self.n_max)
        while n < self.n_max:
            points.append(n)
            n = max(n + 1, math.ceil(n * self.growth))
        return (*points, self.n_max)


def sequential_radius(
    draw: Callable[[int], int],
    radius: Callable[[int, int, float], float | None],
    schedule: SampleSchedule,
    alpha: float,
    radii: Sequence[float],
) -> tuple[float | None, int, int]:
    """Run the sequential test on one input; returns (radius or None to abstain, votes, samples used).

    Args:
        draw: ``draw(k)`` draws k more noisy samples and returns how many voted for the guessed class.
        radius: the smoothing method's rule, ``radius(count, n, alpha)`` (None when pA <= 1/2).
        schedule: where the test may stop.
        alpha: overall failure probability; each checkpoint uses alpha / K.
        radii: the radii whose certification matters (e.g. a table's); the test stops at the first
            checkpoint where the lower-bound radius and the most optimistic radius reachable at
            ``n_max`` (from the upper confidence bound) lie between the same two of them.

    The returned radius is the method's radius at the stopping checkpoint at level alpha / K; with
    probability >= 1 - alpha it is sound whatever the stopping rule, since all K bounds hold at once.
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
    return certified, votes, drawn


def _settled(certified: float | None, reachable: float | None, thresholds: np.ndarray) -> bool:
    """True when no requested radius lies in (certified, reachable]: more samples change nothing asked for."""
    low = -math.inf if certified is None else certified
    high = -math.inf if reachable is None else reachable
    if high <= low:
        return True
    return not bool(np.any((thresholds > low) & (thresholds <= high)))


def certify_adaptive(
    smoothed: SmoothedClassifier,
    x: torch.Tensor,
    *,
    n0: int,
    schedule: SampleSchedule,
    alpha: float,
    radii: Sequence[float],
    generator: torch.Generator | None = None,
) -> Certificate:
    """CERTIFY of Cohen et al. with a sequential estimation step (``sequential_radius``).

    Guess the top class from ``n0`` samples, then draw estimation samples in the rounds of ``schedule``
    until the certified radius is settled with respect to ``radii`` (l2, [0, 1] pixel units). With
    probability >= 1 - alpha the smoothed classifier returns ``label`` on the whole l2 ball of the
    returned radius. ``counts`` and ``no_class`` hold the votes of the estimation samples actually drawn,
    so ``counts.sum() + no_class`` is the number used (at most ``schedule.n_max``). Samples with
    non-finite logits are votes for no class, as in ``SmoothedClassifier.certify``; when all n0 are,
    the certificate abstains without drawing.
    """
    smoothed.method.check_image(x)
    check_count("n0", n0)
    check_alpha(alpha)
    bank = smoothed.noise_bank(x, n0 + schedule.n_max)
    guess = smoothed.top_class(smoothed.sample_counts(x, n0, generator, None if bank is None else bank[:n0]))
    counts = np.zeros(smoothed.num_classes, dtype=np.int64)
    if guess is None:
        return smoothed.certificate(None, counts, alpha)
    drawn = 0

    def draw(k: int) -> int:
        nonlocal drawn
        start = n0 + drawn
        new = smoothed.sample_counts(x, k, generator, None if bank is None else bank[start : start + k])
        counts[:] += new
        drawn += k
        return int(new[guess])

    certified, votes, used = sequential_radius(draw, smoothed.method.radius, schedule, alpha, radii)
    p_lower = clopper_pearson_lower(votes, used, alpha / len(schedule.checkpoints))
    no_class = used - int(counts.sum())
    if certified is None:
        return Certificate(None, 0.0, p_lower, counts, no_class=no_class)
    return Certificate(guess, certified, p_lower, counts, no_class=no_class)
