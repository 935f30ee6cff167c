"""Binomial confidence bounds and the argument checks shared by every smoothing entry point."""

from __future__ import annotations

import numpy as np
import torch
from scipy.special import betaincinv  # beta.ppf's own kernel; scipy.stats costs 0.4 s to import

from qrobust.checks import check_alpha, check_count  # noqa: F401  (re-exported: the smoothing modules import them from here)
from qrobust.errors import QRobustError


def clopper_pearson_lower(successes, trials: int, alpha: float):
    """One-sided (1 - alpha) Clopper-Pearson lower confidence bound on a binomial proportion.

    The exact bound is the alpha quantile of Beta(k, n - k + 1), and 0 when k = 0. ``successes`` may be
    an int (returns a float) or an integer array (returns a float64 array, evaluated at once).
    """
    check_alpha(alpha)
    k = np.asarray(successes)
    if k.size and (k.min() < 0 or k.max() > trials):
        raise ValueError(f"successes must be in [0, trials={trials}], got {successes}")
    bound = np.where(k == 0, 0.0, betaincinv(np.maximum(k, 1), trials - k + 1, alpha))
    return float(bound) if bound.ndim == 0 else bound


def check_image(x: torch.Tensor, float_dtype: torch.dtype | None, method: str) -> None:
    """Raise QRobustError unless ``x`` is a non-empty (C, H, W) image that smoothing ``method`` reads: a
    uint8 lattice image or, when ``float_dtype`` is given, a float image of that dtype in [0, 1]."""
    if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.numel() == 0:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise QRobustError(f"x must be a non-empty (C, H, W) image tensor, got {shape}")
    if x.dtype not in (torch.uint8, float_dtype):
        floats = "" if float_dtype is None else f" or a {str(float_dtype).removeprefix('torch.')} image in [0, 1]"
        raise QRobustError(f"x must be a uint8 lattice image{floats} for {method} smoothing, got dtype {x.dtype}")
    if x.dtype != torch.uint8:
        check_unit_image(x)


def check_unit_image(x: torch.Tensor) -> None:
    """Raise QRobustError unless ``x`` is a finite float tensor in [0, 1]."""
    if not torch.is_floating_point(x):
        raise QRobustError(f"x must be a uint8 lattice image or a float image in [0, 1], got dtype {x.dtype}")
    if not torch.isfinite(x).all():
        raise QRobustError("x contains NaN or infinite values")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise QRobustError(f"x must lie in [0, 1], got values in [{x.min().item():.3g}, {x.max().item():.3g}]")
