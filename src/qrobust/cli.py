"""The ``qrobust`` command line: train, quantize, export, attack, certify, predict, analyze, report,
weight-bound, verify-quantization, search, finetune.

User errors (bad values, missing or corrupt files) end in one ``error:`` line and exit code 2; results
already written stay as they are.
"""

from __future__ import annotations

import io
import json
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.table import Table

from qrobust.attacks import FGSM, PGD, CarliniWagnerL2, ExpectationOverNoise, LatticeInputs, evaluate_attacks
from qrobust.bounds import ReluNetwork, certified_eps_table, verify_quantization
from qrobust.data import dataset_info, load_dataset
from qrobust.errors import QRobustError
from qrobust.jobs import SmoothingJob, run_ray
from qrobust.models import build_model, count_parameters
from qrobust.models.checkpoint import Checkpoint, load_checkpoint, model_metadata, save_checkpoint
from qrobust.outputs import check_outputs, check_writable, exclusive_lock, write_text_atomic
from qrobust.progress import progress_bar
from qrobust.quant import (
    LowBitConfig,
    QuantConfig,
    calibrate,
    convert,
    load_int8,
    prepare_qat,
    save_int8,
    sparsity_report,
)
from qrobust.quant.admm import ADMMConfig, admm_quantize, certificate_epsilons, save_codes
from qrobust.quant.bitops import BitPolicy, bitops_percent, layer_infos
from qrobust.quant.lowbit import MAX_BITS
from qrobust.search import DDPGConfig, PolicySearch, SearchConfig, describe, finetune_policy
from qrobust.search.arq import DEFAULT_WARMUP
from qrobust.smoothing import (
    CERTIFY_SAMPLES_HEADER,
    DEFAULT_RADII,
    PREDICT_HEADER,
    evenly_spaced,
    read_certify_tsv,
    read_predict_tsv,
    summarize_rows,
)
from qrobust.smoothing.confidence import check_count
from qrobust.train import TrainConfig, accuracy, load_model, train
from qrobust.train.loop import model_inputs

app = typer.Typer(
    help="Small, fast and provably robust neural networks: train, certify and analyze.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()

DataRoot = Annotated[
    Path | None,
    typer.Option(help="Directory holding dataset files (default: Fashion-MNIST from the Debian package, else ./data)."),
]
Sigma = Annotated[float, typer.Option(help="Std of the Gaussian noise, in [0, 1] pixel units (> 0).")]
Alpha = Annotated[float, typer.Option(help="Failure probability of the test, in (0, 1); confidence is 1 - alpha.")]
NumExamples = Annotated[int, typer.Option(help="Number of examples, spread evenly over the split (>= 1).")]
BatchSize = Annotated[int, typer.Option(help="Noisy samples per forward pass (memory vs. speed; it shapes the noise stream, so it is recorded).")]
Seed = Annotated[int, typer.Option(help="Seed of the noise (>= 0); each example gets its own generator derived from it.")]
Overwrite = Annotated[bool, typer.Option(help="Replace existing output files instead of refusing.")]
Resume = Annotated[bool, typer.Option(help="Continue an interrupted run with the same settings: keep its complete rows, run only the missing examples.")]


@app.command("train")
def train_command(
    output: Annotated[Path, typer.Option(help="Checkpoint file to write (.pt); rewritten after every epoch.")],
    dataset: Annotated[str, typer.Option(help="Dataset name: fashion-mnist, mnist, cifar10, cifar100, svhn, digits.")] = "fashion-mnist",
    data_root: DataRoot = None,
    model: Annotated[str, typer.Option(help="Model name: mlp, cnn, resnet20, resnet32, resnet44, resnet56, resnet110.")] = "cnn",
    model_option: Annotated[list[str] | None, typer.Option(help="Model option KEY=VALUE, repeatable (e.g. depth=4 for mlp).")] = None,
    init: Annotated[Path | None, typer.Option(help="Start from this checkpoint's model and weights (replaces --model, --model-option, --dataset).")] = None,
    qat: Annotated[bool, typer.Option(help="Quantization-aware training (int8 weights, uint8 activations); convert with `qrobust quantize`.")] = False,
    input_margin: Annotated[int, typer.Option(help="With --qat: the int8 model reads noisy lattice inputs in [-M, 255 + M] instead of clipping them to [0, 255] (about 3 * sigma * 255 keeps large-sigma noise; 0: clip).")] = 0,
    sigma: Annotated[float, typer.Option(help="Std of the noise augmentation, in [0, 1] pixel units (0: none).")] = 0.0,
    noise: Annotated[str, typer.Option(help="Noise kind: gaussian (for FloatRS) or discrete (uint8 lattice, for IntRS).")] = "gaussian",
    loss: Annotated[str | None, typer.Option(help="Loss: natural, gaussian (natural on noisy inputs), pgd (Madry), trades, tradeoff (alpha * natural + beta * PGD). Default: gaussian if --sigma > 0, else natural.")] = None,
    alpha: Annotated[float, typer.Option(help="Weight of the natural loss in the trade-off loss.")] = 1.0,
    beta: Annotated[float, typer.Option(help="Weight of the robust term in trades and tradeoff.")] = 1.0,
    eps: Annotated[float, typer.Option(help="l_inf radius of the training adversaries, in [0, 1] pixel units.")] = 0.031,
    step_size: Annotated[float, typer.Option(help="PGD step size of the training adversaries.")] = 0.007,
    attack_steps: Annotated[int, typer.Option(help="PGD steps of the training adversaries.")] = 10,
    quant: Annotated[str, typer.Option(help="Low-bit weights: none, bc (BinaryConnect) or br (Binary-Relax).")] = "none",
    bits: Annotated[int, typer.Option(help="Weight bits with --quant, 1..8: 1 binary, 2 ternary, m >= 3 the 2^m - 1 levels -M..M, M = 2^(m-1) - 1 (4 bits: 15).")] = 1,
    rho: Annotated[float, typer.Option(help="Binary-Relax: growth factor of lambda per epoch (> 1).")] = LowBitConfig.rho,
    cutoff_epoch: Annotated[int, typer.Option(help="Binary-Relax: epochs of relaxation before pure projection (0: BinaryConnect).")] = LowBitConfig.cutoff_epoch,
    epochs: Annotated[int, typer.Option(help="Number of epochs.")] = 90,
    batch_size: Annotated[int, typer.Option(help="Images per SGD step.")] = 256,
    lr: Annotated[float, typer.Option(help="Initial learning rate.")] = 0.1,
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = 0.9,
    weight_decay: Annotated[float, typer.Option(help="L2 weight decay.")] = 1e-4,
    lr_step: Annotated[int, typer.Option(help="Epochs between learning-rate drops.")] = 30,
    lr_gamma: Annotated[float, typer.Option(help="Factor applied to the learning rate at each drop.")] = 0.1,
    augment: Annotated[bool, typer.Option(help="Use the dataset's standard augmentation (crop + flip for CIFAR).")] = True,
    train_subset: Annotated[int | None, typer.Option(help="Train on this many training images (seeded subset).")] = None,
    test_subset: Annotated[int | None, typer.Option(help="Evaluate on this many test images (seeded subset).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of initialisation, shuffling, augmentation and noise (>= 0).")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted run saved in OUTPUT.")] = False,
    overwrite: Overwrite = False,
) -> None:
    """Train a classifier (noise augmentation, adversarial losses, low-bit or int8 quantization-aware weights) and save a checkpoint."""
    _check_counts({"--epochs": epochs, "--batch-size": batch_size, "--lr-step": lr_step, "--attack-steps": attack_steps,
                   "--bits": bits}, seed)  # fmt: skip
    if quant != "none" and not 1 <= bits <= MAX_BITS:
        raise QRobustError(f"--bits must be in 1..{MAX_BITS}, got {bits}")
    check_outputs([output], overwrite=overwrite or resume, resumable=True)
    config = TrainConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay,
        lr_step=lr_step, lr_gamma=lr_gamma, sigma=sigma, noise=noise, augment=augment, seed=seed,
        loss=loss, alpha=alpha, beta=beta, eps=eps, step_size=step_size,
        attack_steps=attack_steps, quant=quant, bits=bits, rho=rho, cutoff_epoch=cutoff_epoch,
    )  # fmt: skip
    torch.manual_seed(seed)
    if init is None:
        options = _parse_options(model_option or [])
        info = dataset_info(dataset)
        network, quant_config = build_model(model, info, **options), None
    else:
        network, start = load_model(init)
        model, options, info = start.metadata["model"], start.metadata["model_options"], start.dataset_info
        quant_config = start.metadata.get("qat")
    if input_margin and not qat:
        raise QRobustError("--input-margin applies to quantization-aware training: add --qat")
    if input_margin and quant_config is not None and quant_config.get("input_margin", 0) != input_margin:
        raise QRobustError(f"--init is quantization-aware with input margin {quant_config.get('input_margin', 0)}; --input-margin cannot change it")
    if quant != "none" and (qat or quant_config is not None):
        raise QRobustError("--quant (low-bit weights) and --qat (int8) cannot be combined")
    if qat and quant_config is None:
        quant_config = asdict(QuantConfig(input_margin=input_margin))
        network = prepare_qat(network.train(), QuantConfig(**quant_config))
    train_set = _subset(load_dataset(info.name, "train", data_root), train_subset, seed)
    test_set = _subset(load_dataset(info.name, "test", data_root), test_subset, seed)
    kind = "quantization-aware " if quant_config else ""
    console.print(f"{kind}{model} ({count_parameters(network):,} parameters) on {info.name}: "
                  f"{len(train_set)} training images, {config.loss} loss, {noise} noise sigma {sigma}"
                  + ("" if quant == "none" else f", {bits}-bit weights by {quant}"))  # fmt: skip
    metadata = model_metadata(model, options, info, sigma=sigma, noise=noise, seed=seed, qat=quant_config,
                              init=None if init is None else str(init))  # fmt: skip
    train(network, train_set, config, test_set=test_set, checkpoint_path=output, metadata=metadata, resume=resume)

    clean = accuracy(network, test_set)
    method = config.noise_method()
    noisy = clean if method is None else accuracy(network, test_set, noise=method, generator=torch.Generator().manual_seed(seed))
    checkpoint = load_checkpoint(output)
    checkpoint.metadata["accuracy"] = {"clean": clean, "noisy": noisy, "test_images": len(test_set)}
    if quant != "none":
        report = sparsity_report(network)
        checkpoint.metadata["sparsity"] = asdict(report)
        console.print(f"{bits}-bit weights: {100 * report.weight_sparsity:.2f}% of conv weights and "
                      f"{100 * report.channel_sparsity:.2f}% of conv channels ({report.zero_channels}/{report.total_channels}) are zero")  # fmt: skip
    save_checkpoint(output, checkpoint)
    console.print(f"test accuracy: clean {100 * clean:.2f}%" + (f", with {noise} noise sigma={sigma}: {100 * noisy:.2f}%" if method else "")
                  + f"  -> {output}")  # fmt: skip


@app.command("quantize")
def quantize_command(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint written by `qrobust train` (float, or --qat).")],
    output: Annotated[Path, typer.Option(help="int8 model file to write (.int8.pt); with --method admm or lb a checkpoint (.pt), plus OUTPUT with suffix .codes.pt (integer codes and scales) and .json (run config and history).")],
    calibration_images: Annotated[int, typer.Option(help="Training images to calibrate a float model's activation ranges (post-training quantization; ignored for QAT checkpoints).")] = 512,
    method: Annotated[str, typer.Option(help="int8 (Jacob et al.: QAT or PTQ, integer-only model), admm (Weng et al. 2020, low-bit weights by ADMM) or lb (Leng et al. 2018).")] = "int8",
    bits: Annotated[int | None, typer.Option(help="admm/lb: weight bits per layer, 2..8 (codes -2^(bits-2)..2^(bits-2)); default 8.")] = None,
    certified: Annotated[bool, typer.Option(help="admm: keep every layer's weights within the certified weight-perturbation radius (qrobust.bounds) of the float ones.")] = False,
    percentile: Annotated[float | None, typer.Option(help="--certified: the radius of layer k is this percentile (0..100) of its certified bounds over --certify-images training images; default 50.")] = None,
    certify_images: Annotated[int, typer.Option(help="--certified: correctly classified training images the percentile is taken over.")] = 100,
    iterations: Annotated[int | None, typer.Option(help=f"admm/lb: ADMM iterations (default {ADMMConfig.iterations}).")] = None,
    steps: Annotated[int | None, typer.Option(help=f"admm/lb: SGD steps per ADMM iteration (default {ADMMConfig.steps}).")] = None,
    input_margin: Annotated[int | None, typer.Option(help="int8 from a float checkpoint (PTQ): the int8 model reads noisy lattice inputs in [-M, 255 + M] instead of clipping them to [0, 255] (about 3 * sigma * 255 keeps large-sigma noise); a QAT checkpoint keeps the margin it was trained with.")] = None,
    data_root: DataRoot = None,
    seed: Annotated[int, typer.Option(help="Seed of the calibration subset and its noise (int8), or of the minibatches (admm, lb).")] = 0,
    overwrite: Overwrite = False,
) -> None:
    """Convert a checkpoint to an integer-only int8 model (Jacob et al. 2018): QAT checkpoints directly,
    float ones after calibration on noisy training images (PTQ). With --method admm or lb: quantize a float
    checkpoint's weights to low-bit codes and one scale per layer by ADMM, optionally certificate-aware."""
    _check_counts({"--calibration-images": calibration_images, "--certify-images": certify_images}, seed)
    check_outputs([output, output.with_suffix(".codes.pt"), output.with_suffix(".json")] if method in ADMM_METHODS else [output],
                  overwrite=overwrite)  # fmt: skip
    lowbit_options = {"--bits": bits, "--percentile": percentile, "--iterations": iterations, "--steps": steps}
    if method in ADMM_METHODS and input_margin is not None:
        raise QRobustError("--input-margin applies to --method int8")
    if method in ADMM_METHODS:
        _quantize_admm(checkpoint, output, method, bits, certified, percentile, certify_images, iterations, steps, data_root, seed)
        return
    if method != "int8":
        raise QRobustError(f"method must be one of int8, {', '.join(ADMM_METHODS)}, got {method!r}")
    used = [name for name, value in lowbit_options.items() if value is not None] + (["--certified"] if certified else [])
    if used:
        raise QRobustError(f"{', '.join(used)} need --method admm or lb (not int8)")
    model, saved = load_model(checkpoint)
    info = saved.dataset_info
    noise = TrainConfig(sigma=saved.metadata.get("sigma", 0.0), noise=saved.metadata.get("noise", "gaussian")).noise_method()
    qat = saved.metadata.get("qat")
    if qat is not None and input_margin not in (None, qat.get("input_margin", 0)):
        raise QRobustError(f"{checkpoint} was trained quantization-aware with input margin {qat.get('input_margin', 0)}; --input-margin cannot change it")
    if qat is None:
        check_count("calibration images", calibration_images)
        images = load_dataset(info.name, "train", data_root).subset(calibration_images, seed).images
        ptq = prepare_qat(model, QuantConfig(input_margin=input_margin or 0))
        model = calibrate(ptq, model_inputs(images, noise, torch.Generator().manual_seed(seed)))
    int8 = convert(model)
    test_set = load_dataset(info.name, "test", data_root)
    test_set = test_set.subset(min(1000, len(test_set)), seed)
    with torch.no_grad():
        predictions, float_predictions = int8(test_set.images).argmax(1), model(test_set.floats()).argmax(1)
    accuracy_int8 = float((predictions == test_set.labels).float().mean())
    agreement = float((predictions == float_predictions).float().mean())
    quantization = "qat" if qat else "ptq"
    metadata = saved.metadata | {"quantization": quantization, "source": str(checkpoint), "int8_accuracy": accuracy_int8}
    size = save_int8(output, int8, metadata)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)  # the fp32 weights alone, without the optimizer state of the checkpoint
    fp32_size = buffer.getbuffer().nbytes
    console.print(f"int8 model ({quantization}): {size / 1024:.1f} KiB, {100 * size / fp32_size:.0f}% of the "
                  f"{fp32_size / 1024:.1f} KiB of fp32 weights; clean accuracy {100 * accuracy_int8:.2f}%, "
                  f"top-1 agreement with the float model {100 * agreement:.2f}% ({len(test_set)} test images)  -> {output}")  # fmt: skip


ADMM_METHODS = ("admm", "lb")


def _quantize_admm(checkpoint: Path, output: Path, method: str, bits: int | None, certified: bool,
                   percentile: float | None, certify_images: int, iterations: int | None, steps: int | None,
                   data_root: Path | None, seed: int) -> None:  # fmt: skip
    """``quantize --method admm|lb``: low-bit ADMM quantization of a float checkpoint (qrobust.quant.admm)."""
    if certified and method != "admm":
        raise QRobustError("--certified applies to --method admm (the LB method has no certificate constraint)")
    if percentile is not None and not certified:
        raise QRobustError("--percentile applies to --certified")
    percentile = 50.0 if percentile is None else percentile
    if not 0 <= percentile <= 100:
        raise QRobustError(f"percentile must be in [0, 100], got {percentile:g}")
    check_count("certify images", certify_images)
    defaults = ADMMConfig()
    config = ADMMConfig(bits=defaults.bits if bits is None else bits, method=method, seed=seed,
                        iterations=defaults.iterations if iterations is None else iterations,
                        steps=defaults.steps if steps is None else steps)  # fmt: skip
    model, saved = load_model(checkpoint)
    if saved.metadata.get("qat") is not None:
        raise QRobustError(f"{checkpoint} is quantization-aware (int8); --method {method} quantizes float checkpoints")
    info = saved.dataset_info
    train_set, test_set = load_dataset(info.name, "train", data_root), load_dataset(info.name, "test", data_root)
    test_set = test_set.subset(min(1000, len(test_set)), seed)
    epsilons = None
    if certified:
        candidates = train_set.select(evenly_spaced(len(train_set), min(len(train_set), 10 * certify_images)))
        with torch.no_grad():
            correct = (model(candidates.floats()).argmax(1) == candidates.labels).nonzero().flatten()
        if len(correct) == 0:
            raise QRobustError("the model classifies none of the training images it was certified on correctly")
        chosen = candidates.select(correct[evenly_spaced(len(correct), min(certify_images, len(correct)))])
        console.print(f"certifying each layer on {len(chosen)} correctly classified training images ...")
        epsilons = certificate_epsilons(model, chosen.floats(), chosen.labels, percentile)
        console.print("certified radii eps_c (percentile " + f"{percentile:g}): " + ", ".join(f"{name} {eps:.3g}" for name, eps in epsilons.items()))
    result = admm_quantize(model, train_set, config, epsilons=epsilons, test_set=test_set, progress=True)
    float_accuracy, quantized_accuracy = accuracy(model, test_set), accuracy(result.model, test_set)
    record = {"method": method, "certified": certified, "percentile": percentile if certified else None,
              "epsilons": epsilons, "source": str(checkpoint), "float_accuracy": float_accuracy,
              "accuracy": quantized_accuracy, "test_images": len(test_set)}  # fmt: skip
    metadata = saved.metadata | {"quantization": record | {"bits": config.bits}}
    save_checkpoint(output, Checkpoint(result.model.state_dict(), metadata))
    codes = output.with_suffix(".codes.pt")
    size = save_codes(codes, result, metadata)
    _write_config(output, {"command": "quantize", **record, "seed": seed, "model": saved.metadata} | result.summary())
    console.print(f"{config.bits}-bit {method}{' (certified)' if certified else ''}: test accuracy "
                  f"{100 * quantized_accuracy:.2f}% (float {100 * float_accuracy:.2f}%, {len(test_set)} images); "
                  f"codes {size / 1024:.1f} KiB  -> {output}, {codes}")  # fmt: skip


@app.command("export")
def export_command(
    model_file: Annotated[Path, typer.Argument(help="A `qrobust train` fp32 checkpoint or a `qrobust quantize` int8 file.")],
    output: Annotated[Path, typer.Option(help="ONNX file to write (.onnx).")],
    overwrite: Overwrite = False,
) -> None:
    """Export a model to ONNX for edge runtimes: fp32 as it is ([0, 1] images in), int8 in QOperator form
    (uint8 activations, lattice values in), with the model's metadata; needs the onnx extra."""
    check_outputs([output], overwrite=overwrite)
    try:
        from qrobust.quant.export import INPUT_KIND, save_onnx, to_onnx
    except ImportError as error:
        raise QRobustError(str(error)) from None
    model = to_onnx(model_file)
    lattice = {prop.key: prop.value for prop in model.metadata_props}[INPUT_KIND] == "lattice"
    kind = "int8 (QOperator, uint8 activations)" if lattice else "fp32"
    size = save_onnx(model, output)
    console.print(f"{kind} ONNX model: {size / 1024:.1f} KiB ({size:,} bytes)  -> {output}")


ATTACKS = ("fgsm", "ifgsm", "pgd", "pgd-l2", "cw")


@app.command("attack")
def attack_command(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint written by `qrobust train` (float, quantization-aware or low-bit): the model attacked.")],
    attack: Annotated[list[str] | None, typer.Option(help=f"Attack, repeatable: {', '.join(ATTACKS)} (default: fgsm, ifgsm, cw, the paper's A1-A3).")] = None,
    int8: Annotated[Path | None, typer.Option(help="Also evaluate this `qrobust quantize` int8 model on the same adversarial examples, crafted on CHECKPOINT (its fake-quant twin): a transfer attack.")] = None,
    eps: Annotated[float, typer.Option(help="l_inf radius of fgsm, ifgsm and pgd, in [0, 1] pixel units.")] = 0.031,
    eps_l2: Annotated[float, typer.Option(help="l2 radius of pgd-l2, in [0, 1] pixel units.")] = 0.5,
    steps: Annotated[int, typer.Option(help="Steps of ifgsm, pgd and pgd-l2.")] = 20,
    step_size: Annotated[float | None, typer.Option(help="Step of ifgsm/pgd (default 1/255) and pgd-l2 (default eps-l2 / 8).")] = None,
    cw_lr: Annotated[float, typer.Option(help="Adam learning rate of C&W.")] = 0.01,
    cw_steps: Annotated[int, typer.Option(help="Adam steps of C&W per search round over c.")] = 100,
    cw_search_steps: Annotated[int, typer.Option(help="Rounds of C&W's binary search over c.")] = 5,
    sigma: Annotated[float, typer.Option(help="Attack the Gaussian-smoothed model instead: expectation of the base model over this much noise (0: attack the base model).")] = 0.0,
    samples: Annotated[int, typer.Option(help="Noise draws per image with --sigma.")] = 8,
    num_examples: NumExamples = 1000,
    split: Annotated[str, typer.Option(help="Dataset split: train or test.")] = "test",
    data_root: DataRoot = None,
    batch_size: Annotated[int, typer.Option(help="Images per attacked batch.")] = 256,
    seed: Annotated[int, typer.Option(help="Seed of the random starts and the noise.")] = 0,
    output: Annotated[Path | None, typer.Option(help="JSON file for the accuracies and the run config.")] = None,
    overwrite: Overwrite = False,
) -> None:
    """Natural accuracy and accuracy under FGSM, IFGSM/PGD (l_inf, l2) and Carlini-Wagner l2 attacks."""
    names = attack or ["fgsm", "ifgsm", "cw"]
    unknown = sorted(set(names) - set(ATTACKS))
    if unknown:
        raise QRobustError(f"unknown attack(s) {', '.join(unknown)}; choose from {', '.join(ATTACKS)}")
    _check_counts({"--steps": steps, "--samples": samples, "--num-examples": num_examples, "--batch-size": batch_size}, seed)
    check_outputs([] if output is None else [output], overwrite=overwrite)
    model, saved = load_model(checkpoint)
    models = {checkpoint.name: model}
    if int8 is not None:
        models[int8.name] = LatticeInputs(load_int8(int8).model)
    source = model if sigma == 0 else ExpectationOverNoise(model, sigma, samples, generator=torch.Generator().manual_seed(seed))
    generator = torch.Generator().manual_seed(seed)
    step = 1 / 255 if step_size is None else step_size
    builders = {
        "fgsm": lambda: FGSM(source, eps),
        "ifgsm": lambda: PGD(source, norm="inf", eps=eps, step_size=step, steps=steps, random_start=False),
        "pgd": lambda: PGD(source, norm="inf", eps=eps, step_size=step, steps=steps, generator=generator),
        "pgd-l2": lambda: PGD(source, norm="2", eps=eps_l2, step_size=eps_l2 / 8 if step_size is None else step_size,
                              steps=steps, generator=generator),
        "cw": lambda: CarliniWagnerL2(source, lr=cw_lr, steps=cw_steps, search_steps=cw_search_steps),
    }  # fmt: skip
    attacks = {"natural": None} | {name: builders[name]() for name in dict.fromkeys(names)}
    data = load_dataset(saved.dataset_info.name, split, data_root)
    data = data.select(_example_indices(len(data), num_examples, split))
    accuracies = evaluate_attacks(models, attacks, data.images, data.labels, batch_size=batch_size, progress=True)
    table = Table(title=f"accuracy (%) on {len(data)} {split} images" + (f", smoothed sigma {sigma}" if sigma else ""))
    table.add_column("model")
    for name in attacks:
        table.add_column(name, justify="right")
    for model_name, row in accuracies.items():
        table.add_row(model_name, *(f"{100 * row[name]:.2f}" for name in attacks))
    console.print(table)
    for name, value in attacks.items():
        console.print(f"{name}: {value!r}" if value is not None else "natural: clean images", highlight=False)
    if output is not None:
        _write_json(output, {"command": "attack", "checkpoint": str(checkpoint), "int8": None if int8 is None else str(int8),
                             "attacks": {name: repr(value) for name, value in attacks.items()}, "sigma": sigma,
                             "samples": samples, "split": split, "examples": len(data), "seed": seed,
                             "accuracy": accuracies, "model": saved.metadata})  # fmt: skip
        console.print(f"-> {output}")


CheckpointPath = Annotated[Path, typer.Argument(help="Model: a `qrobust train` checkpoint for --method float-fp, a `qrobust quantize` int8 file for float-quant and int.")]
Split = Annotated[str, typer.Option(help="Dataset split: train or test.")]
Method = Annotated[str, typer.Option(help="Smoothing: float-fp (Gaussian noise, fp32 model), float-quant (Gaussian noise rounded to the integer lattice, int8 model) or int (IntRS: discrete noise on the uint8 lattice, int8 model, integer radius table).")]
NoiseBank = Annotated[bool, typer.Option(help="Draw the noise once (from --seed) and reuse it for every example: faster with int8 models, memory (n0 + n) images.")]
Fast = Annotated[bool, typer.Option(help="Run the base model on the fast path (frozen TorchScript for fp32, torch's x86 int8 kernels for int8) instead of eager fp32 / the integer reference engine.")]
Backend = Annotated[str, typer.Option(help="Where to run: local (this process) or ray (examples sharded over Ray workers; pip install 'qrobust[ray]').")]
Workers = Annotated[int, typer.Option(help="With --backend ray: worker processes, one CPU and one torch thread each.")]
Runtime = Annotated[str, typer.Option(help="Base model runtime: torch (see --fast) or onnxruntime (the model exported to ONNX, as on an edge device; pip install 'qrobust[onnx]').")]
Address = Annotated[str | None, typer.Option(help="With --backend ray: an existing cluster (host:port or auto); default: start a local one.")]
MemoryLimit = Annotated[float | None, typer.Option(help="GiB the run may use (model file, noise bank, batches), checked before allocating (default: 80% of RAM).")]


@app.command("certify")
def certify_command(
    checkpoint: CheckpointPath,
    sigma: Sigma,
    output: Annotated[Path, typer.Option(help="TSV to write (idx label predict radius correct time); the run config goes to OUTPUT with suffix .json.")],
    method: Method = "float-fp",
    fast: Fast = True,
    noise_bank: NoiseBank = False,
    n0: Annotated[int, typer.Option(help="Noisy samples to guess the top class (>= 1).")] = 100,
    n: Annotated[int, typer.Option(help="Noisy samples to bound its probability (>= 1).")] = 100_000,
    alpha: Alpha = 0.001,
    num_examples: NumExamples = 500,
    split: Split = "test",
    data_root: DataRoot = None,
    batch_size: BatchSize = 256,
    seed: Seed = 0,
    adaptive: Annotated[bool, typer.Option(help="Draw the n samples in doubling rounds and stop each example once the --radii are settled (valid under optional stopping).")] = False,
    radii: Annotated[str, typer.Option(help="With --adaptive: comma-separated l2 radii whose certification must be settled.")] = ",".join(f"{r:g}" for r in DEFAULT_RADII),
    runtime: Runtime = "torch",
    backend: Backend = "local",
    workers: Workers = 2,
    address: Address = None,
    overwrite: Overwrite = False,
    resume: Resume = False,
    memory_limit: MemoryLimit = None,
) -> None:
    """Certify l2 robustness of the smoothed model (Cohen et al. 2019; IntRS, Lin et al. 2021); radii are in [0, 1] pixel units."""
    _check_counts({"--n0": n0, "--n": n, "--num-examples": num_examples, "--batch-size": batch_size, "--workers": workers}, seed)
    job = SmoothingJob("certify", str(checkpoint), method, sigma, n, alpha, n0, fast, noise_bank, batch_size, seed, split,
                       None if data_root is None else str(data_root), _parse_radii(radii) if adaptive else None, runtime, memory_limit)  # fmt: skip
    _run_job(job, output, num_examples, overwrite, resume, backend, workers, address)


@app.command("predict")
def predict_command(
    checkpoint: CheckpointPath,
    sigma: Sigma,
    output: Annotated[Path, typer.Option(help="TSV to write (idx label predict correct time); the run config goes to OUTPUT with suffix .json.")],
    method: Method = "float-fp",
    fast: Fast = True,
    noise_bank: NoiseBank = False,
    n: Annotated[int, typer.Option(help="Noisy samples per example (>= 1).")] = 100_000,
    alpha: Alpha = 0.001,
    num_examples: NumExamples = 500,
    split: Split = "test",
    data_root: DataRoot = None,
    batch_size: BatchSize = 256,
    seed: Seed = 0,
    runtime: Runtime = "torch",
    backend: Backend = "local",
    workers: Workers = 2,
    address: Address = None,
    overwrite: Overwrite = False,
    resume: Resume = False,
    memory_limit: MemoryLimit = None,
) -> None:
    """Predict with the smoothed model, abstaining (-1) when the top two classes are not separated at level alpha."""
    _check_counts({"--n": n, "--num-examples": num_examples, "--batch-size": batch_size, "--workers": workers}, seed)
    job = SmoothingJob("predict", str(checkpoint), method, sigma, n, alpha, fast=fast, noise_bank=noise_bank,
                       batch_size=batch_size, seed=seed, split=split, data_root=None if data_root is None else str(data_root),
                       runtime=runtime, memory_limit=memory_limit)  # fmt: skip
    _run_job(job, output, num_examples, overwrite, resume, backend, workers, address)


@app.command("analyze")
def analyze_command(
    results: Annotated[list[Path], typer.Argument(help="Certification TSVs written by `qrobust certify`.")],
    radii: Annotated[str, typer.Option(help="Comma-separated l2 radii in [0, 1] pixel units for the table.")] = ",".join(f"{r:g}" for r in DEFAULT_RADII),
    plot: Annotated[Path | None, typer.Option(help=f"File for the plot of certified accuracy against radius ({', '.join(PLOT_SUFFIXES)}).")] = None,
    label: Annotated[list[str] | None, typer.Option(help="Name of each run in table and plot (default: file stem), repeatable.")] = None,
    overwrite: Overwrite = False,
) -> None:
    """Certified accuracy at radii, average certified radius (ACR) and certified percentage of one or more runs.

    Rows are checked (line number of the first bad one): unique indices, classes of the dataset (from
    the run config next to each TSV, if any), finite radii >= 0, 0 for abstentions."""
    if plot is not None:
        check_outputs([plot], overwrite=overwrite, option="--plot")
        if plot.suffix.lower() not in PLOT_SUFFIXES:
            raise QRobustError(f"--plot must name a {', '.join(PLOT_SUFFIXES)} file, got {plot}")
    from qrobust.report import plot_certified_accuracy, summary_tables  # matplotlib is slow to import

    at = _parse_radii(radii)
    names = label or [path.stem for path in results]
    if len(names) != len(results):
        raise QRobustError(f"got {len(names)} --label values for {len(results)} result files")
    runs = {name: read_certify_tsv(path) for name, path in zip(names, results, strict=True)}
    wide = Console(width=max(console.width, 132))  # tables of several runs do not fit 80 columns
    for table in summary_tables(runs, at):
        wide.print(table)
    if plot is not None:
        console.print(f"plot -> {plot_certified_accuracy(runs, plot)}")


PLOT_SUFFIXES = (".png", ".pdf", ".svg")


@app.command("search")
def search_command(
    checkpoint: Annotated[Path, typer.Argument(help="Float checkpoint written by `qrobust train`, noise-trained at --sigma: the model whose bit-widths are searched.")],
    sigma: Sigma,
    budget: Annotated[float, typer.Option(help="BitOPs limit in percent of the fp32 model's, in (0, 100] (uniform 4 bits costs about 1.6%).")],
    output: Annotated[Path, typer.Option(help="Directory for policy.json (best policy), search.jsonl (one line per episode; an existing one is resumed), best.pt (its fine-tuned quantized checkpoint), fixed-policy.json (the uniform baseline) and config.json.")] = Path("search"),
    episodes: Annotated[int, typer.Option(help="Search episodes in all (a resumed search counts the logged ones).")] = SearchConfig.episodes,
    reward: Annotated[str, typer.Option(help="arq (ACR of the quantized smoothed model minus the original's), certified (certified accuracy at --reward-radius minus the original's) or haq (accuracy of the quantized model on noisy validation images).")] = SearchConfig.reward,
    reward_radius: Annotated[float, typer.Option(help="l2 radius of the certified reward, in [0, 1] pixel units.")] = SearchConfig.reward_radius,
    certifier: Annotated[str, typer.Option(help="irs (incremental, reusing the original's certificates) or rs (plain smoothing with --n-zeta samples) for each candidate.")] = SearchConfig.certifier,
    warmup: Annotated[int, typer.Option(help="Episodes of random actions before the agent learns.")] = DEFAULT_WARMUP,
    finetune_images: Annotated[int, typer.Option(help="Training images (n1) of each policy's one-epoch noisy fine-tuning.")] = SearchConfig.finetune_images,
    finetune_lr: Annotated[float, typer.Option(help="Learning rate of that fine-tuning (SGD, momentum 0.9).")] = SearchConfig.finetune_lr,
    validation_images: Annotated[int, typer.Option(help="Held-out training images the reward is measured on.")] = SearchConfig.validation_images,
    n0: Annotated[int, typer.Option(help="Noisy samples to guess the top class (original certification and IRS fallback).")] = SearchConfig.n0,
    n: Annotated[int, typer.Option(help="Noisy samples of the original model's certification, done once.")] = SearchConfig.n,
    n_zeta: Annotated[int, typer.Option(help="Noisy samples per image certifying each quantized model (IRS), <= --n.")] = SearchConfig.n_zeta,
    alpha: Alpha = SearchConfig.alpha,
    alpha_zeta: Annotated[float, typer.Option(help="Failure probability of IRS's disagreement bound, in (0, 1).")] = SearchConfig.alpha_zeta,
    gamma: Annotated[float, typer.Option(help="IRS certifies from scratch where the original's pA_lower >= gamma.")] = SearchConfig.gamma,
    batch_size: Annotated[int, typer.Option(help="Images per SGD step and noisy samples per forward pass.")] = SearchConfig.batch_size,
    data_root: DataRoot = None,
    seed: Annotated[int, typer.Option(help="Seed of the agent, the image draws, the fine-tuning and the noise.")] = 0,
) -> None:
    """Search per-layer weight/activation bit-widths under a BitOPs budget (ARQ, Yang et al. 2025): a DDPG
    agent rewarded by the certified radius of the fine-tuned quantized smoothed model."""
    _check_counts({"--episodes": episodes, "--finetune-images": finetune_images, "--validation-images": validation_images,
                   "--n0": n0, "--n": n, "--n-zeta": n_zeta, "--batch-size": batch_size}, seed)  # fmt: skip
    config = SearchConfig(
        sigma=sigma, budget=budget, episodes=episodes, reward=reward, certifier=certifier,
        reward_radius=reward_radius, finetune_images=finetune_images,
        finetune_lr=finetune_lr, batch_size=batch_size, validation_images=validation_images, n0=n0, n=n,
        n_zeta=n_zeta, alpha=alpha, alpha_zeta=alpha_zeta, gamma=gamma, seed=seed,
        agent=DDPGConfig(warmup_episodes=warmup, seed=seed),
    )  # fmt: skip
    check_writable(output)
    model, saved = _float_model(checkpoint, "search")
    log = output / "search.jsonl"
    search = PolicySearch(model, load_dataset(saved.dataset_info.name, "train", data_root), config)  # checks the budget
    console.print(("resuming " if log.exists() else "") + f"{reward} search over {saved.metadata['model']} at "
                  f"{budget:g}% BitOPs, sigma {sigma}" + ("" if reward == "haq" else
                  f"; certifying the original smoothed model on {validation_images} images first (n0 {n0}, n {n})"))  # fmt: skip
    _write_json(output / "config.json", {"command": "search", "checkpoint": str(checkpoint), **config.to_dict(), "model": saved.metadata})
    search.fixed_policy.save(output / "fixed-policy.json")
    metadata = model_metadata(saved.metadata["model"], saved.metadata["model_options"], saved.dataset_info,
                              sigma=sigma, noise="gaussian", source=str(checkpoint))  # fmt: skip
    result = search.run(log, best_checkpoint=output / "best.pt", metadata=metadata, progress=True)
    result.best.policy.save(output / "policy.json")
    original = "" if result.acr_original is None else f" (original ACR {result.acr_original:.3f})"
    console.print(f"best: {describe(result.best)}{original}  -> {output / 'policy.json'}, {output / 'best.pt'}")


@app.command("finetune")
def finetune_command(
    checkpoint: Annotated[Path, typer.Argument(help="Float checkpoint written by `qrobust train`: the model to quantize.")],
    policy: Annotated[Path, typer.Option(help="Bit policy JSON written by `qrobust search` (policy.json, fixed-policy.json).")],
    sigma: Annotated[float, typer.Option(help="Std of the Gaussian noise augmentation, in [0, 1] pixel units (> 0).")],
    output: Annotated[Path, typer.Option(help="Checkpoint to write (.pt), rewritten after every epoch; certify it with --method float-fp.")],
    epochs: Annotated[int, typer.Option(help="Fine-tuning epochs (ARQ: 10).")] = 10,
    lr: Annotated[float, typer.Option(help="Initial learning rate (ARQ: 0.01).")] = 0.01,
    lr_step: Annotated[int, typer.Option(help="Epochs between learning-rate drops by 10x (ARQ: 5).")] = 5,
    batch_size: Annotated[int, typer.Option(help="Images per SGD step.")] = 256,
    calibration_images: Annotated[int, typer.Option(help="Noisy training images the clips are calibrated on first.")] = 512,
    train_subset: Annotated[int | None, typer.Option(help="Fine-tune on this many training images (seeded subset).")] = None,
    data_root: DataRoot = None,
    seed: Annotated[int, typer.Option(help="Seed of shuffling, noise and the calibration draw.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted run saved in OUTPUT.")] = False,
    overwrite: Overwrite = False,
) -> None:
    """Quantize a float checkpoint with a mixed-precision bit policy and fine-tune it with Gaussian noise."""
    if not sigma > 0:
        raise QRobustError(f"sigma must be > 0, got {sigma}")
    _check_counts({"--epochs": epochs, "--lr-step": lr_step, "--batch-size": batch_size, "--calibration-images": calibration_images}, seed)
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, lr_step=lr_step, sigma=sigma, seed=seed)
    check_outputs([output], overwrite=overwrite or resume, resumable=True)
    if not policy.is_file():
        raise QRobustError(f"policy file not found: {policy}")
    try:
        bit_policy = BitPolicy.load(policy)
    except UnicodeDecodeError:
        raise QRobustError(f"{policy} is not a JSON bit policy: it is not text") from None
    model, saved = _float_model(checkpoint, "finetune")
    info = saved.dataset_info
    layers = layer_infos(model, info.shape)
    if len(layers) != bit_policy.num_layers:
        raise QRobustError(f"{policy} has {bit_policy.num_layers} layers but {saved.metadata['model']} in {checkpoint} has {len(layers)}: a policy for another model")
    train_set = _subset(load_dataset(info.name, "train", data_root), train_subset, seed)
    percent = bitops_percent(layers, bit_policy)
    console.print(f"{saved.metadata['model']} with weights {list(bit_policy.weight_bits)}, activations "
                  f"{list(bit_policy.act_bits)} bits ({percent:.2f}% BitOPs): {epochs} epochs on {len(train_set)} images, sigma {sigma}")  # fmt: skip
    metadata = model_metadata(saved.metadata["model"], saved.metadata["model_options"], info, sigma=sigma,
                              noise="gaussian", seed=seed, source=str(checkpoint), bitops_percent=percent)  # fmt: skip
    mixed = finetune_policy(model, bit_policy, train_set, config, calibration_images=calibration_images,
                            checkpoint_path=output, metadata=metadata, resume=resume, progress=True)  # fmt: skip
    test_set = load_dataset(info.name, "test", data_root)
    test_set = test_set.subset(min(1000, len(test_set)), seed)
    clean = accuracy(mixed, test_set)
    noisy = accuracy(mixed, test_set, noise=config.noise_method(), generator=torch.Generator().manual_seed(seed))
    written = load_checkpoint(output)
    written.metadata["accuracy"] = {"clean": clean, "noisy": noisy, "test_images": len(test_set)}
    save_checkpoint(output, written)
    console.print(f"test accuracy: clean {100 * clean:.2f}%, with Gaussian noise sigma={sigma}: {100 * noisy:.2f}%  -> {output}")


@app.command("weight-bound")
def weight_bound_command(
    checkpoint: Annotated[Path, typer.Argument(help="Float checkpoint written by `qrobust train` (a chain of Linear/Conv2d/ReLU/MaxPool layers: mlp, cnn).")],
    layers: Annotated[list[int] | None, typer.Option("--layers", help="Layer k (the k-th Linear/Conv2d, 0-based) to perturb alone, repeatable (default: every layer).")] = None,
    norm: Annotated[float, typer.Option(help="p of the l_p ball of each output unit's weights, >= 1 (inf: elementwise box).")] = float("inf"),
    bias: Annotated[bool, typer.Option(help="Perturb the biases too (each joins its unit's ball).")] = False,
    num_examples: NumExamples = 100,
    split: Split = "test",
    data_root: DataRoot = None,
    output: Annotated[Path | None, typer.Option(help="JSON file for the per-input radii and the run config.")] = None,
    overwrite: Overwrite = False,
) -> None:
    """Certified weight-perturbation radius of each layer (Weng et al. 2020): within it, the prediction provably stays the true label."""
    _check_counts({"--num-examples": num_examples})
    check_outputs([] if output is None else [output], overwrite=overwrite)
    model, saved = _float_model(checkpoint, "weight-bound")
    network = ReluNetwork.from_model(model)
    for k in layers or []:
        network.check_layer(k)
    data = load_dataset(saved.dataset_info.name, split, data_root)
    indices = _example_indices(len(data), num_examples, split)
    data = data.select(indices)
    chosen = list(dict.fromkeys(layers)) if layers else list(range(network.num_layers))
    with progress_bar() as bar:
        task = bar.add_task("weight-bound", total=len(chosen), status="")
        rows = certified_eps_table(network, data.images, data.labels, chosen, norm, bias=bias,
                                   on_layer=lambda row: bar.update(task, advance=1, status=f"layer {row.layer}"))  # fmt: skip
    table = Table(title=f"certified l_{norm:g} weight radius per layer ({len(data)} {split} images; 0 where misclassified)")
    for column in ("layer", "type", "bounds", "certified %", "mean eps", "median eps"):
        table.add_column(column, justify="left" if column in ("type", "bounds") else "right")
    for row in rows:
        table.add_row(str(row.layer), row.description, row.method, f"{100 * row.certified_fraction:.1f}", f"{row.mean:.3g}", f"{row.median:.3g}")
    console.print(table)
    if output is not None:
        _write_json(output, {"command": "weight-bound", "checkpoint": str(checkpoint), "norm": f"{norm:g}", "bias": bias,
                             "split": split, "indices": indices, "model": saved.metadata,
                             "layers": [{"layer": row.layer, "type": row.description, "method": row.method, "mean": row.mean,
                                         "median": row.median, "certified_fraction": row.certified_fraction,
                                         "eps": row.eps.tolist()} for row in rows]})  # fmt: skip
        console.print(f"-> {output}")


@app.command("verify-quantization")
def verify_quantization_command(
    checkpoint: Annotated[Path, typer.Argument(help="Float checkpoint written by `qrobust train` (mlp, cnn).")],
    int8_file: Annotated[Path, typer.Argument(help="Its int8 model, written by `qrobust quantize`.")],
    num_examples: NumExamples = 1000,
    split: Split = "test",
    data_root: DataRoot = None,
    output: Annotated[Path | None, typer.Option(help="JSON file for the per-input certificates and the run config.")] = None,
    overwrite: Overwrite = False,
) -> None:
    """Certify, per image, that the int8 model predicts what the float model predicts (weight and activation rounding bounded)."""
    _check_counts({"--num-examples": num_examples})
    check_outputs([] if output is None else [output], overwrite=overwrite)
    model, saved = _float_model(checkpoint, "verify-quantization")
    int8 = load_int8(int8_file)
    int8_dataset = int8.metadata.get("dataset", {}).get("name")
    if int8_dataset not in (None, saved.dataset_info.name):
        raise QRobustError(f"{int8_file} was made for {int8_dataset}, {checkpoint} for {saved.dataset_info.name}")
    data = load_dataset(saved.dataset_info.name, split, data_root)
    indices = _example_indices(len(data), num_examples, split)
    data = data.select(indices)
    result = verify_quantization(model, int8.model, data.images)
    agreement = float((int8.model.predict(data.images) == result.float_predictions).float().mean())
    console.print(f"certified: {int(result.certified.sum())}/{len(data)} {split} images ({100 * result.fraction:.1f}%) provably "
                  f"get the float model's prediction from the int8 model; measured agreement {100 * agreement:.1f}%")  # fmt: skip
    if output is not None:
        _write_json(output, {"command": "verify-quantization", "checkpoint": str(checkpoint), "int8": str(int8_file),
                             "split": split, "indices": indices, "certified_fraction": result.fraction, "agreement": agreement,
                             "certified": result.certified.tolist(), "margin_lower": result.margin_lower.tolist(),
                             "model": saved.metadata})  # fmt: skip
        console.print(f"-> {output}")


def _float_model(checkpoint: Path, command: str):
    """The float model of a `qrobust train` checkpoint and the checkpoint; quantized ones are refused."""
    model, saved = load_model(checkpoint)
    for key, kind in (("qat", "quantization-aware (int8)"), ("bit_policy", "mixed-precision quantized"), ("quantization", "quantized")):
        if saved.metadata.get(key) is not None:
            raise QRobustError(f"{checkpoint} is {kind}; `qrobust {command}` starts from a float checkpoint")
    return model, saved


@app.command("report")
def report_command(
    directories: Annotated[list[Path], typer.Argument(help="Result directories holding `qrobust certify` TSVs (searched recursively).")],
    output: Annotated[Path, typer.Option(help="Directory for the page (README.md) and its PNG plots.")],
    radii: Annotated[str, typer.Option(help="Comma-separated l2 radii in [0, 1] pixel units for the tables.")] = ",".join(f"{r:g}" for r in DEFAULT_RADII),
    overwrite: Annotated[bool, typer.Option(help="Replace the page and plots of an earlier report in OUTPUT instead of refusing.")] = False,
) -> None:
    """A Markdown page with plots comparing every certification run found: curves, tables, timing, settings."""
    if output.exists() and not output.is_dir():
        raise QRobustError(f"--output {output} is a file; name a directory for the page and its plots")
    check_writable(output)
    from qrobust.report import write_report  # matplotlib is slow to import

    page = write_report(directories, output, _parse_radii(radii), command=" ".join(["qrobust", *sys.argv[1:]]), overwrite=overwrite)
    console.print(f"report -> {page}")


def _run_job(job: SmoothingJob, output: Path, num_examples: int, overwrite: bool, resume: bool, backend: str,
             workers: int, address: str | None) -> None:  # fmt: skip
    """Check every argument and file, then, holding the output's lock, run the missing examples and
    append their rows: to the complete rows of the interrupted run that ``resume`` continues, or to a
    new TSV and run config written when the first row is ready (a run that fails before it leaves no file)."""
    if backend not in ("local", "ray"):
        raise QRobustError(f"backend must be local or ray, got {backend!r}")
    if output.suffix == ".json":
        raise QRobustError(f"--output {output} must not end in .json: the run config goes to OUTPUT with suffix .json")
    check_outputs([output], overwrite=overwrite or resume, resumable=True)  # before any work; again under the lock
    with exclusive_lock(output):
        check_outputs([output], overwrite=overwrite or resume, resumable=True)
        smoothed, data, metadata = job.open()
        indices = _example_indices(len(data), num_examples, job.split)
        run_config = {**asdict(job), "indices": indices, "model": metadata}
        header, reader = (CERTIFY_SAMPLES_HEADER, read_certify_tsv) if job.command == "certify" else (PREDICT_HEADER, read_predict_tsv)
        if resume and output.exists():
            done, start = _resumable_rows(output, run_config, reader), None
        else:
            _check_config_is_free(output, run_config, overwrite)
            done, start = [], (header, run_config)
        todo = indices[len(done) :]
        rows = job.rows(smoothed, data, todo) if backend == "local" else run_ray(job, todo, workers, address)
        correct = _write_rows(output, rows, done, len(indices), job.command, start)
    if job.command == "predict":
        console.print(f"smoothed accuracy {100 * correct / len(indices):.1f}%  -> {output}")
        return
    summary = summarize_rows(read_certify_tsv(output))
    console.print(f"certified accuracy at radius 0: {100 * summary.certified_accuracy[0]:.1f}%, "
                  f"ACR {summary.average_certified_radius:.3f}  -> {output}")  # fmt: skip


def _config_changes(config_path: Path, run_config: dict[str, Any]) -> list[str] | None:
    """The settings of ``run_config`` that the run config saved in ``config_path`` differs in (None if
    that file is missing or not a run config)."""
    try:
        saved = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict):
        return None
    current = json.loads(json.dumps(run_config))  # as it would read back from disk
    return [key for key in current if saved.get(key) != current[key]]


def _check_config_is_free(output: Path, run_config: dict[str, Any], overwrite: bool) -> None:
    """Refuse to replace an existing OUTPUT.json that is not this run's own config, unless ``overwrite``."""
    config_path = output.with_suffix(".json")
    if config_path.exists() and not overwrite and _config_changes(config_path, run_config) != []:
        raise QRobustError(f"{config_path} exists and is not this run's config, which would replace it; "
                           "pass --overwrite to replace it, or choose another --output")  # fmt: skip


def _resumable_rows(output: Path, run_config: dict[str, Any], reader) -> list:
    """The complete rows of the interrupted run in ``output``, after checking it had the same settings."""
    config_path = output.with_suffix(".json")
    changed = _config_changes(config_path, run_config)
    if changed is None:
        raise QRobustError(f"cannot resume {output}: its run config {config_path} is missing or corrupt")
    if changed:
        raise QRobustError(f"cannot resume {output}: it was run with other {', '.join(changed)}; "
                           "pass --overwrite to start again")  # fmt: skip
    done = reader(output, interrupted=True)
    if [row.idx for row in done] != run_config["indices"][: len(done)]:
        raise QRobustError(f"cannot resume {output}: its rows are not the run's first examples in order")
    complete = output.read_bytes().rfind(b"\n") + 1
    os.truncate(output, complete)  # drop a row cut off by the crash; complete rows stay byte for byte
    return done


def _write_rows(output: Path, rows: Iterator, done: list, total: int, task: str, start: tuple[str, dict[str, Any]] | None) -> int:
    """Append rows to the TSV ``output`` as they come, with a progress bar; returns the number correct.

    ``start``: the header and run config of a new run, written (atomically) when the first row is ready.
    Each row goes out whole in one write, newline last, then is flushed: a run killed at any moment
    leaves complete rows and at most one cut-off last line, which ``--resume`` drops.
    """
    correct = sum(row.correct for row in done)
    with progress_bar() as bar, ExitStack() as stack:
        progress = bar.add_task(task, total=total, completed=len(done), status="")
        table = None
        for count, row in enumerate(rows, start=len(done) + 1):
            if table is None:
                if start is not None:
                    _write_config(output, start[1])
                    write_text_atomic(output, start[0] + "\n")
                table = stack.enter_context(output.open("a"))
            table.write(row.to_line() + "\n")
            table.flush()
            correct += row.correct
            bar.update(progress, advance=1, status=f"correct {correct}/{count}")
    return correct


def _write_config(output: Path, run_config: dict[str, Any]) -> None:
    """The full run config (with the model's metadata) next to the results, so a run can be reproduced."""
    _write_json(output.with_suffix(".json"), run_config)


def _write_json(path: Path, record: dict[str, Any]) -> None:
    """``record`` with the time and command line, as indented JSON, written atomically."""
    record = record | {"started": datetime.now(UTC).isoformat(timespec="seconds"), "argv": sys.argv}
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")


def _check_counts(counts: dict[str, int], seed: int = 0) -> None:
    """Refuse, naming the option, a count below 1 or a negative seed."""
    for option, value in counts.items():
        check_count(option, value)
    if seed < 0:
        raise QRobustError(f"--seed must be an integer >= 0, got {seed}")


def _example_indices(size: int, num_examples: int, split: str) -> list[int]:
    """``--num-examples`` indices spread evenly over a split of ``size`` examples."""
    if num_examples > size:
        raise QRobustError(f"--num-examples must be at most {size} (the {split} split's size), got {num_examples}")
    return evenly_spaced(size, num_examples)


def _subset(data, size: int | None, seed: int):
    return data if size is None else data.subset(size, seed)


def _parse_options(pairs: list[str]) -> dict[str, Any]:
    """KEY=VALUE strings to a dict; values are parsed as JSON when they can be (numbers, booleans)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise QRobustError(f"model option must look like KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _parse_radii(text: str) -> tuple[float, ...]:
    try:
        radii = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise QRobustError(f"radii must be comma-separated numbers, got {text!r}") from None
    if any(not r >= 0 for r in radii):
        raise QRobustError(f"radii must be >= 0, got {text!r}")
    return radii


def main() -> None:
    """Entry point of the ``qrobust`` console script."""
    with warnings.catch_warnings():  # the library's warnings as one line each, not Python's file:line form
        warnings.showwarning = _warn
        warnings.simplefilter("ignore", DeprecationWarning)  # torch's notices to developers, hidden as Python does by default
        try:
            code = app(standalone_mode=False)
        except typer.TyperException as error:  # usage errors: unknown option, bad type, missing argument
            _fail(error.format_message(), getattr(error, "exit_code", 2))
        except (QRobustError, ValueError, OSError) as error:
            _fail(str(error), 2)
        except (KeyboardInterrupt, typer.Abort):
            _fail("interrupted", 130)
    sys.exit(code if isinstance(code, int) else 0)


def _warn(message, category, filename, lineno, file=None, line=None) -> None:  # the warnings.showwarning signature
    Console(stderr=True).print(f"[bold yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


def _fail(message: str, code: int) -> None:
    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    sys.exit(code)
