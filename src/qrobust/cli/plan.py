"""``plan``: how many noisy samples certifying a radius takes (``qrobust.smoothing.planner``)."""

from typing import Annotated

import typer
from rich.table import Table

from qrobust.checks import check_alpha, check_sigma
from qrobust.cli.core import app, console
from qrobust.cli.options import Alpha, Sigma
from qrobust.errors import QRobustError


@app.command("plan")
def plan_command(
    sigma: Sigma,
    radius: Annotated[float, typer.Option(help="l2 radius to certify, in [0, 1] pixel units (> 0).")],
    alpha: Alpha = 0.001,
    p_a: Annotated[
        float | None,
        typer.Option(help="Also plan for an input whose top class has this probability under noise, in (0, 1)."),
    ] = None,
    method: Annotated[
        str,
        typer.Option(
            help="Radius rule: float-fp or float-quant (Gaussian), int or lattice (the sound lattice radius)."
        ),
    ] = "float-fp",
) -> None:
    """The smallest n that can certify --radius at all (every vote for the class), and at --p-a, for fixed-n
    CERTIFY and for sequential certification (certify --adaptive)."""
    check_sigma(sigma)
    check_alpha(alpha, "--alpha")
    if not radius > 0:
        raise QRobustError(f"--radius must be > 0, got {radius}")
    if p_a is not None and not 0 < p_a < 1:
        raise QRobustError(f"--p-a must be in (0, 1), got {p_a}")
    from qrobust.jobs import METHODS
    from qrobust.smoothing.methods import radius_map_for
    from qrobust.smoothing.planner import N_LIMIT, plan

    if method not in METHODS:
        raise QRobustError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    result = plan(radius_map_for(METHODS[method](sigma)), radius, alpha, p_a)
    table = Table(title=f"samples n to certify radius {radius:g} ({method}, sigma {sigma:g}, alpha {alpha:g})")
    for column in ("input", "fixed n (CERTIFY)", "sequential (--adaptive)"):
        table.add_column(column, justify="left" if column == "input" else "right")

    def cell(n: int | None) -> str:
        return f"> {N_LIMIT:,}" if n is None else f"{n:,}"

    table.add_row("every vote for the class (pA -> 1)", cell(result.fixed_any), cell(result.sequential_any))
    if p_a is not None:
        table.add_row(f"pA = {p_a:g} (certified half the time)", cell(result.fixed_at), cell(result.sequential_at))
    console.print(table)
    console.print(f"the radius needs pA above {result.p_needed:.6f}")
