"""Plots and tables of certification runs (the face layer: nothing below imports it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # the object API: no pyplot global state, no display needed
from rich.table import Table

from qrobust.smoothing import ABSTAIN, DEFAULT_RADII, CertifyRow, certified_accuracy_curve, summarize_rows


def summary_tables(runs: dict[str, list[CertifyRow]], radii=DEFAULT_RADII) -> tuple[Table, Table]:
    """Two rich tables, one row per run: certified accuracy (%) at each radius as Cohen et al. define it
    (over all examples) with ACR, certified percentage, seconds per example and speed relative to the
    first run; and as the IntRS paper's eq. 10 defines it (over the examples not abstained)."""
    summaries = {name: summarize_rows(rows, radii) for name, rows in runs.items()}
    seconds = {name: float(np.mean([row.seconds for row in rows])) for name, rows in runs.items()}
    first = next(iter(seconds.values()))
    cohen = _table("Certified accuracy (%), over all examples (Cohen et al.)", radii)
    for column in ("ACR", "certified %", "s/example", "speed vs first"):
        cohen.add_column(column, justify="right")
    paper = _table("Certified accuracy (%), over non-abstained examples (IntRS eq. 10)", radii)
    for name, summary in summaries.items():
        cohen.add_row(
            name,
            str(summary.num_examples),
            *(f"{100 * value:.1f}" for value in summary.certified_accuracy),
            f"{summary.average_certified_radius:.3f}",
            f"{100 * summary.certified_percentage:.1f}",
            f"{seconds[name]:.3f}",
            f"{first / seconds[name]:.2f}x",
        )
        paper.add_row(name, str(summary.num_examples), *(f"{100 * v:.1f}" for v in summary.certified_accuracy_non_abstained))
    return cohen, paper


def _table(title: str, radii) -> Table:
    table = Table(title=title)
    table.add_column("run", no_wrap=True)
    table.add_column("N", justify="right")
    for radius in radii:
        table.add_column(f"r={radius:g}", justify="right")
    return table


def plot_certified_accuracy(runs: dict[str, list[CertifyRow]], path: str | Path, title: str = "") -> Path:
    """Save a PNG of certified accuracy against l2 radius, one line per run; returns the path."""
    figure = Figure(figsize=(6, 4), dpi=120)
    axes = figure.add_subplot()
    for name, rows in runs.items():
        radius = np.array([row.radius for row in rows])
        correct = np.array([row.correct for row in rows])
        abstained = np.array([row.predict == ABSTAIN for row in rows])
        grid, accuracy = certified_accuracy_curve(radius, correct, abstained)
        axes.plot(grid, accuracy, label=name)
    axes.set_xlabel("l2 radius (pixels in [0, 1])")
    axes.set_ylabel("certified accuracy")
    axes.set_ylim(0, 1)
    axes.set_xlim(left=0)
    axes.grid(alpha=0.3)
    axes.legend()
    if title:
        axes.set_title(title)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
