"""``export``: a model as ONNX for edge runtimes."""

from pathlib import Path
from typing import Annotated

import typer

from qrobust.cli.common import import_model
from qrobust.cli.core import app, console
from qrobust.cli.options import ModelFactory, Overwrite
from qrobust.errors import QRobustError
from qrobust.outputs import check_outputs


@app.command("export")
def export_command(
    model_file: Annotated[
        Path, typer.Argument(help="A `qrobust train` fp32 checkpoint or a `qrobust quantize` int8 file.")
    ],
    output: Annotated[Path, typer.Option(help="ONNX file to write (.onnx).")],
    model: ModelFactory = None,
    overwrite: Overwrite = False,
) -> None:
    """Export a model to ONNX for edge runtimes: fp32 as it is ([0, 1] images in), int8 in QOperator form
    (uint8 activations, lattice values in), with the model's metadata; needs the onnx extra."""
    check_outputs([output], overwrite=overwrite)
    try:
        from qrobust.quant.export import INPUT_KIND, save_onnx, to_onnx
    except ImportError as error:
        raise QRobustError(str(error)) from None
    import_model(model)
    onnx_model = to_onnx(model_file)
    lattice = {prop.key: prop.value for prop in onnx_model.metadata_props}[INPUT_KIND] == "lattice"
    kind = "int8 (QOperator, uint8 activations)" if lattice else "fp32"
    size = save_onnx(onnx_model, output)
    console.print(f"{kind} ONNX model: {size / 1024:.1f} KiB ({size:,} bytes)  -> {output}")
