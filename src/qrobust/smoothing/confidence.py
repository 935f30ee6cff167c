"""Binomial confidence bounds and the argument checks shared by every smoothing entry point."""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import beta


def clopper_pearson_lower(successes, trials: int, alpha: float):
    """One-sided (1 - alpha) Clopper-Pearson lower confidence bound on a binomial proportion.

    The exact bound is the alpha quantile of Beta(k, n - k + 1), and 0 when k = 0. ``successes`` may be
    an int (returns a float) or an integer array (returns a float64 array, evaluated at once).
    """
    check_alpha(alpha)
    k = np.asarray(successes)
    if k.size and (k.min() < 0 or k.max() > trials):
        raise ValueError(f"successes must be in [0, trials={trials}], got {successes}")
    bound = np.where(k == 0, 0.0, beta.ppf(alpha, np.maximum(k, 1), trials - k + 1))
    return float(bound) if bound.ndim == 0 else bound


def check_count(name: str, value: int) -> None:
    """Raise ValueError unless the sample count ``value`` is an integer >= 1."""
    if int(value) != value or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def check_alpha(alpha: float) -> None:
    """Raise ValueError unless the failure probability ``alpha`` is in (0, 1)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")


def check_unit_image(x: torch.Tensor) -> None:
    """Raise ValueError unless ``x`` is a finite float tensor in [0, 1]."""
    if not torch.is_floating_point(x):
        raise ValueError(f"x must be a uint8 lattice image or a float image in [0, 1], got dtype {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or infinite values")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError(f"x must lie in [0, 1], got values in [{x.min().item():.3g}, {x.max().item():.3g}]")
