"""``certify`` and ``predict``: randomized smoothing of a model over a dataset split, resumable."""

import warnings
from typing import Annotated

import typer

from qrobust.cli.common import parse_radii
from qrobust.cli.core import app, console
from qrobust.cli.options import DEFAULT_RADII, SmoothingOptions, with_smoothing_options
from qrobust.errors import QRobustError


@app.command("certify")
@with_smoothing_options
def certify_command(
    options: SmoothingOptions,
    n0: Annotated[int, typer.Option(help="Noisy samples to guess the top class (>= 1).")] = 100,
    n: Annotated[int, typer.Option(help="Noisy samples to bound its probability (>= 1).")] = 100_000,
    adaptive: Annotated[
        bool,
        typer.Option(
            help="Draw at most n samples per example and stop once the --radii are settled (valid under optional stopping); the TSV's samples column says how many were used."
        ),
    ] = False,
    radii: Annotated[
        str, typer.Option(help="With --adaptive: comma-separated l2 radii whose certification must be settled.")
    ] = DEFAULT_RADII,
    sequential: Annotated[
        str,
        typer.Option(
            help="With --adaptive: cs (a confidence sequence, checked after every batch) or union (Clopper-Pearson at alpha / K over doubling checkpoints, for comparison)."
        ),
    ] = "cs",
    randomized_bound: Annotated[
        bool,
        typer.Option(
            help="Fixed n only: the randomized Clopper-Pearson bound (coverage exactly 1 - alpha over the votes and a seeded coin per example, never below the plain bound; a rerun with another --seed may certify another radius)."
        ),
    ] = False,
) -> None:
    """Certify l2 robustness of the smoothed model (Cohen et al. 2019; IntRS, Lin et al. 2021); radii are in [0, 1] pixel units."""
    options.check({"--n0": n0, "--n": n})
    if sequential not in ("cs", "union"):
        raise QRobustError(f"--sequential must be cs or union, got {sequential!r}")
    if randomized_bound and adaptive:
        raise QRobustError("--randomized-bound applies to fixed-n certification: leave out --adaptive")
    asked = parse_radii(radii)
    _warn_unreachable(options, n, asked if adaptive else parse_radii(DEFAULT_RADII), adaptive)
    settle = asked if adaptive else None
    options.run("certify", n=n, n0=n0, settle_radii=settle, sequential=sequential, randomized_bound=randomized_bound)
    from qrobust.smoothing import read_certify_tsv, summarize_rows

    summary = summarize_rows(read_certify_tsv(options.output))
    console.print(
        f"certified accuracy at radius 0: {100 * summary.certified_accuracy[0]:.1f}%, "
        f"ACR {summary.average_certified_radius:.3f}  -> {options.output}"
    )


def _warn_unreachable(options: SmoothingOptions, n: int, radii: tuple[float, ...], adaptive: bool) -> None:
    """Warn, before the run, about the requested (or table) radii that no input can certify with n samples."""
    from qrobust.jobs import METHODS
    from qrobust.smoothing.planner import unreachable_radii

    if options.method not in METHODS:
        raise QRobustError(f"--method must be one of {', '.join(METHODS)}, got {options.method!r}")
    out_of_reach = unreachable_radii(METHODS[options.method](options.sigma), n, options.alpha, radii, adaptive)
    if out_of_reach:
        warnings.warn(
            f"no input can certify radius {', '.join(f'{r:g}' for r in out_of_reach)} with n = {n:,} at alpha "
            f"{options.alpha:g} (sigma {options.sigma:g}): those columns will read 0; `qrobust plan` gives the n needed",
            stacklevel=1,
        )


@app.command("predict")
@with_smoothing_options
def predict_command(
    options: SmoothingOptions,
    n: Annotated[int, typer.Option(help="Noisy samples per example (>= 1).")] = 100_000,
) -> None:
    """Predict with the smoothed model, abstaining (-1) when the top two classes are not separated at level alpha."""
    options.check({"--n": n})
    correct = options.run("predict", n=n)
    console.print(f"smoothed accuracy {100 * correct / options.num_examples:.1f}%  -> {options.output}")
