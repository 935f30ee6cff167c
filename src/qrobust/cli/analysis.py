"""``analyze`` (tables and a plot of certification runs) and ``report`` (a Markdown page of all runs)."""

import sys
from pathlib import Path
from typing import Annotated

import typer

from qrobust.cli.common import parse_radii
from qrobust.cli.core import app, console
from qrobust.cli.options import DEFAULT_RADII, Overwrite, Radii
from qrobust.errors import QRobustError
from qrobust.outputs import check_outputs, check_writable

PLOT_SUFFIXES = (".png", ".pdf", ".svg")


@app.command("analyze")
def analyze_command(
    results: Annotated[list[Path], typer.Argument(help="Certification TSVs written by `qrobust certify`.")],
    radii: Radii = DEFAULT_RADII,
    plot: Annotated[
        Path | None,
        typer.Option(help=f"File for the plot of certified accuracy against radius ({', '.join(PLOT_SUFFIXES)})."),
    ] = None,
    label: Annotated[
        list[str] | None, typer.Option(help="Name of each run in table and plot (default: file stem), repeatable.")
    ] = None,
    overwrite: Overwrite = False,
) -> None:
    """Certified accuracy at radii, average certified radius (ACR) and certified percentage of one or more runs.

    Rows are checked (line number of the first bad one): unique indices, classes of the dataset (from
    the run config next to each TSV, if any), finite radii >= 0, 0 for abstentions."""
    if plot is not None:
        check_outputs([plot], overwrite=overwrite, option="--plot")
        if plot.suffix.lower() not in PLOT_SUFFIXES:
            raise QRobustError(f"--plot must name a {', '.join(PLOT_SUFFIXES)} file, got {plot}")
    at = parse_radii(radii)
    names = label or [path.stem for path in results]
    if len(names) != len(results):
        raise QRobustError(f"got {len(names)} --label values for {len(results)} result files")
    from rich.console import Console

    from qrobust.report import plot_certified_accuracy, summary_tables
    from qrobust.smoothing import read_certify_tsv

    runs = {name: read_certify_tsv(path) for name, path in zip(names, results, strict=True)}
    wide = Console(width=max(console.width, 132))  # tables of several runs do not fit 80 columns
    for table in summary_tables(runs, at):
        wide.print(table)
    if plot is not None:
        console.print(f"plot -> {plot_certified_accuracy(runs, plot)}")


@app.command("report")
def report_command(
    directories: Annotated[
        list[Path], typer.Argument(help="Result directories holding `qrobust certify` TSVs (searched recursively).")
    ],
    output: Annotated[Path, typer.Option(help="Directory for the page (README.md) and its PNG plots.")],
    radii: Radii = DEFAULT_RADII,
    overwrite: Annotated[
        bool, typer.Option(help="Replace the page and plots of an earlier report in OUTPUT instead of refusing.")
    ] = False,
) -> None:
    """A Markdown page with plots comparing every certification run found: curves, tables, timing, settings."""
    if output.exists() and not output.is_dir():
        raise QRobustError(f"--output {output} is a file; name a directory for the page and its plots")
    check_writable(output)
    at = parse_radii(radii)
    from qrobust.report import write_report

    page = write_report(directories, output, at, command=" ".join(["qrobust", *sys.argv[1:]]), overwrite=overwrite)
    console.print(f"report -> {page}")
