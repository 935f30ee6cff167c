"""``weight-bound`` (certified weight-perturbation radii) and ``verify-quantization`` (int8 = float, proved)."""

from pathlib import Path
from typing import Annotated

import typer

from qrobust.cli.common import check_counts, float_model
from qrobust.cli.core import app, console
from qrobust.cli.options import DataRoot, ModelFactory, NumExamples, Overwrite, Split
from qrobust.errors import QRobustError
from qrobust.outputs import check_outputs, write_json_record


@app.command("weight-bound")
def weight_bound_command(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            help="Float checkpoint written by `qrobust train` (a chain of Linear/Conv2d/ReLU/MaxPool layers: mlp, cnn)."
        ),
    ],
    layers: Annotated[
        list[int] | None,
        typer.Option(
            "--layers",
            help="Layer k (the k-th Linear/Conv2d, 0-based) to perturb alone, repeatable (default: every layer).",
        ),
    ] = None,
    norm: Annotated[
        float, typer.Option(help="p of the l_p ball of each output unit's weights, >= 1 (inf: elementwise box).")
    ] = float("inf"),
    bias: Annotated[bool, typer.Option(help="Perturb the biases too (each joins its unit's ball).")] = False,
    num_examples: NumExamples = 100,
    split: Split = "test",
    data_root: DataRoot = None,
    model: ModelFactory = None,
    output: Annotated[Path | None, typer.Option(help="JSON file for the per-input radii and the run config.")] = None,
    overwrite: Overwrite = False,
) -> None:
    """Certified weight-perturbation radius of each layer (Weng et al. 2020): within it, the prediction provably stays the true label."""
    check_counts({"--num-examples": num_examples})
    check_outputs([] if output is None else [output], overwrite=overwrite)
    from rich.table import Table

    from qrobust.bounds import ReluNetwork, certified_eps_table
    from qrobust.data import load_dataset
    from qrobust.progress import progress_bar
    from qrobust.runner import example_indices

    network_model, saved = float_model(checkpoint, "weight-bound", model)
    network = ReluNetwork.from_model(network_model)
    for k in layers or []:
        network.check_layer(k)
    data = load_dataset(saved.dataset_info.name, split, data_root)
    indices = example_indices(len(data), num_examples, split)
    data = data.select(indices)
    chosen = list(dict.fromkeys(layers)) if layers else list(range(network.num_layers))
    with progress_bar() as bar:
        task = bar.add_task("weight-bound", total=len(chosen), status="")
        rows = certified_eps_table(
            network,
            data.images,
            data.labels,
            chosen,
            norm,
            bias=bias,
            on_layer=lambda row: bar.update(task, advance=1, status=f"layer {row.layer}"),
        )
    table = Table(
        title=f"certified l_{norm:g} weight radius per layer ({len(data)} {split} images; 0 where misclassified)"
    )
    for column in ("layer", "type", "bounds", "certified %", "mean eps", "median eps"):
        table.add_column(column, justify="left" if column in ("type", "bounds") else "right")
    for row in rows:
        table.add_row(
            str(row.layer),
            row.description,
            row.method,
            f"{100 * row.certified_fraction:.1f}",
            f"{row.mean:.3g}",
            f"{row.median:.3g}",
        )
    console.print(table)
    if output is not None:
        write_json_record(
            output,
            {
                "command": "weight-bound",
                "checkpoint": str(checkpoint),
                "norm": f"{norm:g}",
                "bias": bias,
                "split": split,
                "indices": indices,
                "model": saved.metadata,
                "layers": [
                    {
                        "layer": row.layer,
                        "type": row.description,
                        "method": row.method,
                        "mean": row.mean,
                        "median": row.median,
                        "certified_fraction": row.certified_fraction,
                        "eps": row.eps.tolist(),
                    }
                    for row in rows
                ],
            },
        )
        console.print(f"-> {output}")


@app.command("verify-quantization")
def verify_quantization_command(
    checkpoint: Annotated[Path, typer.Argument(help="Float checkpoint written by `qrobust train` (mlp, cnn).")],
    int8_file: Annotated[Path, typer.Argument(help="Its int8 model, written by `qrobust quantize`.")],
    num_examples: NumExamples = 1000,
    split: Split = "test",
    data_root: DataRoot = None,
    model: ModelFactory = None,
    output: Annotated[
        Path | None, typer.Option(help="JSON file for the per-input certificates and the run config.")
    ] = None,
    overwrite: Overwrite = False,
) -> None:
    """Certify, per image, that the int8 model predicts what the float model predicts (weight and activation rounding bounded)."""
    check_counts({"--num-examples": num_examples})
    check_outputs([] if output is None else [output], overwrite=overwrite)
    from qrobust.bounds import verify_quantization
    from qrobust.data import load_dataset
    from qrobust.quant import load_int8
    from qrobust.runner import example_indices

    network, saved = float_model(checkpoint, "verify-quantization", model)
    int8 = load_int8(int8_file)
    int8_dataset = int8.metadata.get("dataset", {}).get("name")
    if int8_dataset not in (None, saved.dataset_info.name):
        raise QRobustError(f"{int8_file} was made for {int8_dataset}, {checkpoint} for {saved.dataset_info.name}")
    data = load_dataset(saved.dataset_info.name, split, data_root)
    indices = example_indices(len(data), num_examples, split)
    data = data.select(indices)
    result = verify_quantization(network, int8.model, data.images)
    agreement = float((int8.model.predict(data.images) == result.float_predictions).float().mean())
    console.print(
        f"certified: {int(result.certified.sum())}/{len(data)} {split} images ({100 * result.fraction:.1f}%) provably "
        f"get the float model's prediction from the int8 model; measured agreement {100 * agreement:.1f}%"
    )
    if output is not None:
        write_json_record(
            output,
            {
                "command": "verify-quantization",
                "checkpoint": str(checkpoint),
                "int8": str(int8_file),
                "split": split,
                "indices": indices,
                "certified_fraction": result.fraction,
                "agreement": agreement,
                "certified": result.certified.tolist(),
                "margin_lower": result.margin_lower.tolist(),
                "model": saved.metadata,
            },
        )
        console.print(f"-> {output}")
