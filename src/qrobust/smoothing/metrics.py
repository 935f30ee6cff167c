"""Summaries of a certification run: certified accuracy at radii, certified percentage, average certified radius."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class CertifiedSummary:
    """Metrics of one run over N examples.

    certified_accuracy[i]: fraction of all examples certified correct with radius >= radii[i] (Cohen et al.).
    certified_accuracy_non_abstained[i]: the same count divided by the number of examples not abstained
        (IntRS paper, eq. 10); NaN when every example abstained.
    certified_percentage: fraction of examples not abstained (IntRS paper, eq. 9).
    average_certified_radius: sum of radii of correct certified examples divided by N.
    """

    radii: tuple[float, ...]
    certified_accuracy: tuple[float, ...]
    certified_accuracy_non_abstained: tuple[float, ...]
    certified_percentage: float
    average_certified_radius: float
    num_examples: int


def summarize(radius: np.ndarray, correct: np.ndarray, abstained: np.ndarray, radii=DEFAULT_RADII) -> CertifiedSummary:
    """Metrics from per-example arrays of equal length: radius (float), correct and abstained (bool)."""
    radius = np.asarray(radius, dtype=float)
    correct = np.asarray(correct, dtype=bool)
    abstained = np.asarray(abstained, dtype=bool)
    if not (radius.shape == correct.shape == abstained.shape) or radius.ndim != 1:
        raise ValueError(
            f"radius, correct and abstained must be 1-D of equal length, "
            f"got shapes {radius.shape}, {correct.shape}, {abstained.shape}"
        )
    if radius.size == 0:
        raise ValueError("cannot summarize an empty run")
    certified_correct = correct & ~abstained
    counts = [int(np.sum(certified_correct & (radius >= r))) for r in radii]
    answered = int(np.sum(~abstained))
    return CertifiedSummary(
        radii=tuple(float(r) for r in radii),
        certified_accuracy=tuple(count / radius.size for count in counts),
        certified_accuracy_non_abstained=tuple(count / answered if answered else float("nan") for count in counts),
        certified_percentage=float(np.mean(~abstained)),
        average_certified_radius=float(np.sum(np.where(certified_correct, radius, 0.0)) / radius.size),
        num_examples=int(radius.size),
    )


def certified_accuracy_curve(radius: np.ndarray, correct: np.ndarray, abstained: np.ndarray, num_points: int = 200):
    """(radii, certified accuracy) sampled on a uniform grid from 0 to the largest certified radius."""
    radius = np.asarray(radius, dtype=float)
    certified_correct = np.asarray(correct, dtype=bool) & ~np.asarray(abstained, dtype=bool)
    top = float(radius[certified_correct].max()) if certified_correct.any() else 0.0
    grid = np.linspace(0.0, top * 1.05 + 1e-9, num_points)
    return grid, np.array([np.mean(certified_correct & (radius >= r)) for r in grid])
