"""Memory limits: refuse a run or a file up front, before allocating what the machine cannot hold.

Estimates are in bytes and limits in GiB (as ``--memory-limit`` takes them). ``check_memory`` compares a
named estimate with the limit and raises one line naming both. The default limit is 80% of the memory
this process may use: the machine's physical memory, or the cgroup's ``memory.max`` when that is lower
(a container). It is the total, not what is free right now, so the same run on the same machine is
always accepted or always refused; the fifth left out is for the OS, the interpreter and what the
estimates do not count. This module imports nothing heavy, so any part of qrobust can use it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from qrobust.errors import QRobustError

GIB = 2**30
DEFAULT_FRACTION = 0.8
_CGROUP_MAX = Path("/sys/fs/cgroup/memory.max")


def default_memory_limit() -> float:
    """``DEFAULT_FRACTION`` of the physical memory (or of a lower cgroup limit), in GiB."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        total = min(total, int(_CGROUP_MAX.read_text()))
    except (OSError, ValueError):  # no cgroup v2 limit ("max", or not Linux)
        pass
    return DEFAULT_FRACTION * total / GIB


def check_memory(what: str, needed: int, memory_limit: float | None = None, lower: str = "") -> None:
    """Raise QRobustError if ``what`` needs more than ``memory_limit`` GiB (None: the default).

    ``needed`` is the estimate in bytes; ``lower`` names the options that shrink it (e.g. "--n").
    """
    limit = default_memory_limit() if memory_limit is None else check_limit(memory_limit)
    if needed > limit * GIB:
        advice = f" or lower {lower}" if lower else ""
        raise QRobustError(
            f"{what} needs ~{_gib(needed)} GiB, above the memory limit of {_gib(limit * GIB)} GiB; "
            f"pass --memory-limit to raise it{advice}"
        )


def check_samples(n: int, memory_limit: float | None = None) -> None:
    """Refuse n noisy samples per input whose predictions (an int64 each) alone exceed the limit."""
    check_memory(f"n = {n:,} noisy samples (an int64 prediction each)", 8 * n, memory_limit, "--n")


def check_limit(memory_limit: float) -> float:
    """``memory_limit`` (GiB) after checking it is a finite number > 0."""
    if (
        isinstance(memory_limit, bool)
        or not isinstance(memory_limit, int | float)
        or not (math.isfinite(memory_limit) and memory_limit > 0)
    ):
        raise QRobustError(f"--memory-limit must be a number of GiB > 0, got {memory_limit!r}")
    return float(memory_limit)


def _gib(size: float) -> str:
    """``size`` bytes in GiB, to three significant digits below 100 and whole above."""
    value = size / GIB
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"
