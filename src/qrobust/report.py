"""Plots and tables of certification runs (the face layer: nothing below imports it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # the object API: no pyplot global state, no display needed
from rich.table import Table

from qrobust.smoothing import ABSTAIN, CertifiedSummary, CertifyRow, certified_accuracy_curve


def summary_table(summaries: dict[str, CertifiedSummary], title: str = "Certified accuracy") -> Table:
    """A rich table: one row per run, certified accuracy (%) at each radius, ACR and certified percentage."""
    radii = next(iter(summaries.values())).radii
    table = Table(title=title)
    table.add_column("run")
    table.add_column("N", justify="right")
    for radius in radii:
        table.add_column(f"r={radius:g}", justify="right")
    table.add_column("ACR", justify="right")
    table.add_column("certified %", justify="right")
    for name, summary in summaries.items():
        table.add_row(
            name,
            str(summary.num_examples),
            *(f"{100 * value:.1f}" for value in summary.certified_accuracy),
            f"{summary.average_certified_radius:.3f}",
            f"{100 * summary.certified_percentage:.1f}",
        )
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
