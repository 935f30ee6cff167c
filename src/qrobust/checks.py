"""Checks of plain argument values (counts, probabilities, noise levels), raising one-line QRobustErrors.

This module imports nothing heavy, so the command line checks its arguments before loading torch.
"""

from __future__ import annotations

import math
import numbers

from qrobust.errors import QRobustError


def check_count(name: str, value: int, minimum: int = 1) -> None:
    """Raise QRobustError unless ``value`` is an integer >= ``minimum``: a Python or numpy integer, not a
    float (``100.0``) or a bool, which torch would reject or misread far from the call."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise QRobustError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_alpha(alpha: float, name: str = "alpha") -> None:
    """Raise QRobustError unless the failure probability ``alpha`` is a number in (0, 1)."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 < alpha < 1.0:
        raise QRobustError(f"{name} must be in (0, 1), got {alpha!r}")


def check_sigma(sigma: float) -> None:
    """Raise QRobustError unless the noise level ``sigma`` is a finite number > 0 (not a bool)."""
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not (math.isfinite(sigma) and sigma > 0):
        raise QRobustError(f"sigma must be a finite number > 0, got {sigma!r}")
