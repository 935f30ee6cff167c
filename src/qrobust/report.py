"""Plots and tables of certification runs (the face layer: nothing below imports it)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure  # the object API: no pyplot global state, no display needed
from rich.table import Table

from qrobust.errors import QRobustError
from qrobust.outputs import atomic_path, check_outputs, write_text_atomic
from qrobust.smoothing import (
    ABSTAIN,
    CERTIFY_HEADER,
    CERTIFY_SAMPLES_HEADER,
    DEFAULT_RADII,
    CertifiedSummary,
    CertifyRow,
    certified_accuracy_curve,
    read_certify_tsv,
    summarize_rows,
)


@dataclass(frozen=True)
class RunLine:
    """One run's numbers in a comparison: the metrics, seconds per example, and speed vs the first run."""

    name: str
    summary: CertifiedSummary
    seconds: float
    speedup: float


def compare_runs(runs: dict[str, list[CertifyRow]], radii=DEFAULT_RADII) -> list[RunLine]:
    """Summaries of several runs at ``radii``, in order, with speed relative to the first."""
    seconds = {name: float(np.mean([row.seconds for row in rows])) for name, rows in runs.items()}
    first = next(iter(seconds.values()))
    return [
        RunLine(name, summarize_rows(rows, radii), seconds[name], first / seconds[name]) for name, rows in runs.items()
    ]


def summary_tables(runs: dict[str, list[CertifyRow]], radii=DEFAULT_RADII) -> tuple[Table, Table]:
    """Two rich tables, one row per run: certified accuracy (%) at each radius as Cohen et al. define it
    (over all examples) with ACR, certified percentage, seconds per example and speed relative to the
    first run; and as the IntRS paper's eq. 10 defines it (over the examples not abstained)."""
    cohen = _table(COHEN_TITLE, radii)
    for column in EXTRA_COLUMNS:
        cohen.add_column(column, justify="right")
    paper = _table(PAPER_TITLE, radii)
    for line in compare_runs(runs, radii):
        cohen.add_row(*_cohen_cells(line))
        paper.add_row(*_paper_cells(line))
    return cohen, paper


COHEN_TITLE = "Certified accuracy (%), over all examples (Cohen et al.)"
PAPER_TITLE = "Certified accuracy (%), over non-abstained examples (IntRS eq. 10)"
EXTRA_COLUMNS = ("ACR", "certified %", "s/example", "speed vs first")


def _cohen_cells(line: RunLine) -> list[str]:
    summary = line.summary
    return [
        line.name,
        str(summary.num_examples),
        *(f"{100 * value:.1f}" for value in summary.certified_accuracy),
        f"{summary.average_certified_radius:.3f}",
        f"{100 * summary.certified_percentage:.1f}",
        f"{line.seconds:.3f}",
        f"{line.speedup:.2f}x",
    ]


def _paper_cells(line: RunLine) -> list[str]:
    summary = line.summary
    return [line.name, str(summary.num_examples), *(f"{100 * v:.1f}" for v in summary.certified_accuracy_non_abstained)]


def _table(title: str, radii) -> Table:
    table = Table(title=title)
    table.add_column("run", no_wrap=True)
    table.add_column("N", justify="right")
    for radius in radii:
        table.add_column(f"r={radius:g}", justify="right")
    return table


def plot_certified_accuracy(runs: dict[str, list[CertifyRow]], path: str | Path, title: str = "") -> Path:
    """Save a plot of certified accuracy against l2 radius, one line per run, atomically; returns the path.

    The format follows the suffix (.png, .pdf, .svg, ...)."""
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
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format=path.suffix.lstrip(".").lower() or None)
    return path


METHOD_LABELS = {"float-fp": "FloatRS-fp", "int": "IntRS-quant", "float-quant": "FloatRS-quant"}


@dataclass(frozen=True)
class CertifyRun:
    """A certification TSV with the run config written next to it (empty if there is none)."""

    path: Path
    rows: list[CertifyRow]
    config: dict[str, Any]

    @property
    def group(self) -> tuple[str, str, float | None]:
        """Runs compared in one table and plot: same directory, dataset and sigma."""
        dataset = self.config.get("model", {}).get("dataset", {}).get("name", "")
        return str(self.path.parent), dataset, self.config.get("sigma")


def find_runs(directory: Path) -> list[CertifyRun]:
    """Every certification TSV under ``directory`` (recursively), skipping other TSVs."""
    if not directory.is_dir():
        raise QRobustError(f"{directory} is not a directory")
    runs = []
    for path in sorted(directory.rglob("*.tsv")):
        with path.open() as table:
            if table.readline().rstrip("\n") not in (CERTIFY_SAMPLES_HEADER, CERTIFY_HEADER):
                continue
        config_path = path.with_suffix(".json")
        try:
            config = json.loads(config_path.read_text()) if config_path.exists() else {}
        except ValueError:
            raise QRobustError(f"{config_path} is not valid JSON") from None
        runs.append(CertifyRun(path, read_certify_tsv(path), config))
    return runs


def write_report(
    directories: list[Path], output: Path, radii=DEFAULT_RADII, command: str = "", overwrite: bool = False
) -> Path:
    """A Markdown page with PNG plots in ``output``: for every group of certification runs found in
    ``directories`` (same directory, dataset and sigma), the certified-accuracy curves, both
    certified-accuracy tables with ACR, certified percentage and timing, and the runs' settings.
    Returns the page's path (``output``/README.md). Its files (README.md, group-K.png) are checked
    before any is written: an existing one is refused unless ``overwrite``; each is written atomically."""
    runs = [run for directory in directories for run in find_runs(directory)]
    if not runs:
        raise QRobustError(
            f"no certification TSVs (written by `qrobust certify`) under {', '.join(map(str, directories))}"
        )
    groups: dict[tuple, list[CertifyRun]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    page = output / "README.md"
    check_outputs(
        [page, *(output / f"group-{number}.png" for number in range(1, len(groups) + 1))], overwrite=overwrite
    )
    lines = ["# qrobust report", ""]
    if command:
        lines += [f"Made by `{command}`.", ""]
    lines += [f"{len(runs)} certification runs in {len(groups)} groups; radii are l2 in [0, 1] pixel units.", ""]
    for number, ((directory, dataset, sigma), members) in enumerate(sorted(groups.items(), key=_group_order), start=1):
        members.sort(key=_method_order)
        named = dict(zip(_run_names(members), members, strict=True))
        title = f"{directory}: {dataset or 'unknown dataset'}, sigma = {sigma}"
        plot = plot_certified_accuracy(
            {name: run.rows for name, run in named.items()}, output / f"group-{number}.png", title
        )
        lines += [f"## {title}", "", f"![certified accuracy against radius]({plot.name})", ""]
        comparison = compare_runs({name: run.rows for name, run in named.items()}, radii)
        header = ["run", "N", *(f"r={r:g}" for r in radii)]
        lines += [
            f"**{COHEN_TITLE}**",
            "",
            *_markdown_table([*header, *EXTRA_COLUMNS], [_cohen_cells(line) for line in comparison]),
            "",
        ]
        lines += [f"**{PAPER_TITLE}**", "", *_markdown_table(header, [_paper_cells(line) for line in comparison]), ""]
        settings = [
            [name, *(str(run.config.get(key, "")) for key in SETTINGS), os.path.relpath(run.path, output)]
            for name, run in named.items()
        ]
        lines += ["**Settings**", "", *_markdown_table(["run", *SETTINGS, "file"], settings), ""]
    write_text_atomic(page, "\n".join(lines))
    return page


SETTINGS = ("method", "n0", "n", "alpha", "seed", "noise_bank", "fast", "checkpoint")


def _group_order(item: tuple[tuple, list]) -> tuple:
    directory, dataset, sigma = item[0]
    return directory, dataset, -1.0 if sigma is None else sigma


def _method_order(run: CertifyRun) -> tuple[int, str]:
    """FloatRS-fp first (speeds are relative to the first run), then IntRS-quant, FloatRS-quant, others."""
    order = list(METHOD_LABELS)
    method = run.config.get("method")
    return (order.index(method) if method in order else len(order)), run.path.name


def _run_names(runs: list[CertifyRun]) -> list[str]:
    """The method's name (FloatRS-fp, ...) where it is unique in the group, else the file's stem."""
    labels = [METHOD_LABELS.get(run.config.get("method", ""), run.path.stem) for run in runs]
    return [label if labels.count(label) == 1 else run.path.stem for label, run in zip(labels, runs, strict=True)]


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A GitHub Markdown table: the first column left-aligned, the others right-aligned."""
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
        *("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows),
    ]
