"""``quantize`` (int8 by QAT or post-training calibration; low-bit ADMM/LB) and ``export`` (ONNX)."""

from pathlib import Path
from typing import Annotated

import typer

from qrobust.cli.common import check_counts, import_model
from qrobust.cli.core import app, console
from qrobust.cli.options import DataRoot, ModelFactory, Overwrite
from qrobust.errors import QRobustError
from qrobust.outputs import check_outputs, write_json_record

ADMM_METHODS = ("admm", "lb")
ADMM_ITERATIONS, ADMM_STEPS = 20, 100  # qrobust.quant.admm.ADMMConfig's defaults


@app.command("quantize")
def quantize_command(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint written by `qrobust train` (float, or --qat).")],
    output: Annotated[
        Path,
        typer.Option(
            help="int8 model file to write (.int8.pt); with --method admm or lb a checkpoint (.pt), plus OUTPUT with suffix .codes.pt (integer codes and scales) and .json (run config and history)."
        ),
    ],
    calibration_images: Annotated[
        int,
        typer.Option(
            help="Training images to calibrate a float model's activation ranges (post-training quantization; ignored for QAT checkpoints)."
        ),
    ] = 512,
    method: Annotated[
        str,
        typer.Option(
            help="int8 (Jacob et al.: QAT or PTQ, integer-only model), admm (Weng et al. 2020, low-bit weights by ADMM) or lb (Leng et al. 2018)."
        ),
    ] = "int8",
    bits: Annotated[
        int | None,
        typer.Option(help="admm/lb: weight bits per layer, 2..8 (codes -2^(bits-2)..2^(bits-2)); default 8."),
    ] = None,
    certified: Annotated[
        bool,
        typer.Option(
            help="admm: keep every layer's weights within the certified weight-perturbation radius (qrobust.bounds) of the float ones."
        ),
    ] = False,
    percentile: Annotated[
        float | None,
        typer.Option(
            help="--certified: the radius of layer k is this percentile (0..100) of its certified bounds over --certify-images training images; default 50."
        ),
    ] = None,
    certify_images: Annotated[
        int, typer.Option(help="--certified: correctly classified training images the percentile is taken over.")
    ] = 100,
    iterations: Annotated[
        int | None, typer.Option(help=f"admm/lb: ADMM iterations (default {ADMM_ITERATIONS}).")
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help=f"admm/lb: SGD steps per ADMM iteration (default {ADMM_STEPS}).")
    ] = None,
    input_margin: Annotated[
        int | None,
        typer.Option(
            help="int8 from a float checkpoint (PTQ): the int8 model reads noisy lattice inputs in [-M, 255 + M] instead of clipping them to [0, 255] (about 3 * sigma * 255 keeps large-sigma noise); a QAT checkpoint keeps the margin it was trained with."
        ),
    ] = None,
    data_root: DataRoot = None,
    seed: Annotated[
        int, typer.Option(help="Seed of the calibration subset and its noise (int8), or of the minibatches (admm, lb).")
    ] = 0,
    model: ModelFactory = None,
    overwrite: Overwrite = False,
) -> None:
    """Convert a checkpoint to an integer-only int8 model (Jacob et al. 2018): QAT checkpoints directly,
    float ones after calibration on noisy training images (PTQ). With --method admm or lb: quantize a float
    checkpoint's weights to low-bit codes and one scale per layer by ADMM, optionally certificate-aware."""
    check_counts({"--calibration-images": calibration_images, "--certify-images": certify_images}, seed)
    check_outputs(
        [output, output.with_suffix(".codes.pt"), output.with_suffix(".json")] if method in ADMM_METHODS else [output],
        overwrite=overwrite,
    )
    lowbit_options = {"--bits": bits, "--percentile": percentile, "--iterations": iterations, "--steps": steps}
    if method in ADMM_METHODS and input_margin is not None:
        raise QRobustError("--input-margin applies to --method int8")
    if method in ADMM_METHODS:
        _check_admm(method, certified, percentile)
        import_model(model)
        _quantize_admm(
            checkpoint,
            output,
            method,
            bits,
            certified,
            50.0 if percentile is None else percentile,
            certify_images,
            iterations,
            steps,
            data_root,
            seed,
        )
        return
    if method != "int8":
        raise QRobustError(f"method must be one of int8, {', '.join(ADMM_METHODS)}, got {method!r}")
    used = [name for name, value in lowbit_options.items() if value is not None] + (
        ["--certified"] if certified else []
    )
    if used:
        raise QRobustError(f"{', '.join(used)} need --method admm or lb (not int8)")
    import_model(model)
    from qrobust.recipes import quantize_int8

    result = quantize_int8(
        checkpoint,
        output,
        calibration_images=calibration_images,
        input_margin=input_margin,
        data_root=data_root,
        seed=seed,
    )
    console.print(
        f"int8 model ({result.quantization}): {result.size / 1024:.1f} KiB, {100 * result.size / result.fp32_size:.0f}% of the "
        f"{result.fp32_size / 1024:.1f} KiB of fp32 weights; clean accuracy {100 * result.accuracy:.2f}%, "
        f"top-1 agreement with the float model {100 * result.agreement:.2f}% ({result.test_images} test images)  -> {output}"
    )


def _check_admm(method: str, certified: bool, percentile: float | None) -> None:
    """Refuse --certified and --percentile where they do not apply, and a percentile outside [0, 100]."""
    if certified and method != "admm":
        raise QRobustError("--certified applies to --method admm (the LB method has no certificate constraint)")
    if percentile is not None and not certified:
        raise QRobustError("--percentile applies to --certified")
    if percentile is not None and not 0 <= percentile <= 100:
        raise QRobustError(f"percentile must be in [0, 100], got {percentile:g}")


def _quantize_admm(
    checkpoint: Path,
    output: Path,
    method: str,
    bits: int | None,
    certified: bool,
    percentile: float,
    certify_images: int,
    iterations: int | None,
    steps: int | None,
    data_root: Path | None,
    seed: int,
) -> None:
    """``quantize --method admm|lb``: low-bit ADMM quantization of a float checkpoint (qrobust.quant.admm)."""
    from qrobust.data import load_dataset
    from qrobust.models.checkpoint import Checkpoint, save_checkpoint
    from qrobust.quant.admm import ADMMConfig, admm_quantize, save_codes
    from qrobust.recipes import certified_radii
    from qrobust.train import accuracy, load_model

    defaults = ADMMConfig()
    config = ADMMConfig(
        bits=defaults.bits if bits is None else bits,
        method=method,
        seed=seed,
        iterations=defaults.iterations if iterations is None else iterations,
        steps=defaults.steps if steps is None else steps,
    )
    model, saved = load_model(checkpoint)
    if saved.metadata.get("qat") is not None:
        raise QRobustError(f"{checkpoint} is quantization-aware (int8); --method {method} quantizes float checkpoints")
    info = saved.dataset_info
    train_set, test_set = load_dataset(info.name, "train", data_root), load_dataset(info.name, "test", data_root)
    test_set = test_set.subset(min(1000, len(test_set)), seed)
    epsilons = None
    if certified:
        epsilons = certified_radii(model, train_set, certify_images, percentile, log=console.print)
        console.print(
            "certified radii eps_c (percentile "
            + f"{percentile:g}): "
            + ", ".join(f"{name} {eps:.3g}" for name, eps in epsilons.items())
        )
    result = admm_quantize(model, train_set, config, epsilons=epsilons, test_set=test_set, progress=True)
    float_accuracy, quantized_accuracy = accuracy(model, test_set), accuracy(result.model, test_set)
    record = {
        "method": method,
        "certified": certified,
        "percentile": percentile if certified else None,
        "epsilons": epsilons,
        "source": str(checkpoint),
        "float_accuracy": float_accuracy,
        "accuracy": quantized_accuracy,
        "test_images": len(test_set),
    }
    metadata = saved.metadata | {"quantization": record | {"bits": config.bits}}
    save_checkpoint(output, Checkpoint(result.model.state_dict(), metadata))
    codes = output.with_suffix(".codes.pt")
    size = save_codes(codes, result, metadata)
    write_json_record(
        output.with_suffix(".json"),
        {"command": "quantize", **record, "seed": seed, "model": saved.metadata} | result.summary(),
    )
    console.print(
        f"{config.bits}-bit {method}{' (certified)' if certified else ''}: test accuracy "
        f"{100 * quantized_accuracy:.2f}% (float {100 * float_accuracy:.2f}%, {len(test_set)} images); "
        f"codes {size / 1024:.1f} KiB  -> {output}, {codes}"
    )


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
