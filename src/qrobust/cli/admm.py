"""``quantize --method admm|lb``: low-bit weights of a float checkpoint by ADMM (``qrobust.quant.admm``),
optionally within certified weight-perturbation radii."""

from pathlib import Path

from qrobust.cli.core import console
from qrobust.errors import QRobustError
from qrobust.outputs import write_json_record


def check_admm(method: str, certified: bool, percentile: float | None) -> None:
    """Refuse --certified and --percentile where they do not apply, and a percentile outside [0, 100]."""
    if certified and method != "admm":
        raise QRobustError("--certified applies to --method admm (the LB method has no certificate constraint)")
    if percentile is not None and not certified:
        raise QRobustError("--percentile applies to --certified")
    if percentile is not None and not 0 <= percentile <= 100:
        raise QRobustError(f"percentile must be in [0, 100], got {percentile:g}")


def quantize_admm(
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
