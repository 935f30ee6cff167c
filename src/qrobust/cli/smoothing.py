"""``certify`` and ``predict``: randomized smoothing of a model over a dataset split, resumable."""

from typing import Annotated

import typer

from qrobust.cli.common import parse_radii
from qrobust.cli.core import app, console
from qrobust.cli.options import DEFAULT_RADII, SmoothingOptions, with_smoothing_options


@app.command("certify")
@with_smoothing_options
def certify_command(
    options: SmoothingOptions,
    n0: Annotated[int, typer.Option(help="Noisy samples to guess the top class (>= 1).")] = 100,
    n: Annotated[int, typer.Option(help="Noisy samples to bound its probability (>= 1).")] = 100_000,
    adaptive: Annotated[
        bool,
        typer.Option(
            help="Draw the n samples in doubling rounds and stop each example once the --radii are settled (valid under optional stopping)."
        ),
    ] = False,
    radii: Annotated[
        str, typer.Option(help="With --adaptive: comma-separated l2 radii whose certification must be settled.")
    ] = DEFAULT_RADII,
) -> None:
    """Certify l2 robustness of the smoothed model (Cohen et al. 2019; IntRS, Lin et al. 2021); radii are in [0, 1] pixel units."""
    options.check({"--n0": n0, "--n": n})
    options.run("certify", n=n, n0=n0, settle_radii=parse_radii(radii) if adaptive else None)
    from qrobust.smoothing import read_certify_tsv, summarize_rows

    summary = summarize_rows(read_certify_tsv(options.output))
    console.print(
        f"certified accuracy at radius 0: {100 * summary.certified_accuracy[0]:.1f}%, "
        f"ACR {summary.average_certified_radius:.3f}  -> {options.output}"
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
