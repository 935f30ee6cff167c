"""``train``: a classifier with noise augmentation, adversarial losses, low-bit or int8-aware weights."""

from pathlib import Path
from typing import Annotated

import typer

from qrobust.cli.common import check_counts, import_model, parse_options
from qrobust.cli.core import app, console
from qrobust.cli.options import DATASET_NAMES, MODEL_NAMES, DataRoot, Device, Overwrite
from qrobust.devices import check_device_name
from qrobust.errors import QRobustError
from qrobust.outputs import check_outputs

MAX_BITS = 8  # qrobust.quant.lowbit.MAX_BITS
RHO, CUTOFF_EPOCH = 1.05, 80  # qrobust.quant.LowBitConfig's defaults


@app.command("train")
def train_command(
    output: Annotated[Path, typer.Option(help="Checkpoint file to write (.pt); rewritten after every epoch.")],
    dataset: Annotated[
        str,
        typer.Option(
            help=f"Dataset: {', '.join(DATASET_NAMES)}, or your own files as folder:DIR (DIR/train/CLASS/*.png|jpg and DIR/test/CLASS/...) or npz:DIR (DIR/train.npz and DIR/test.npz: images uint8 N,H,W[,C], labels)."
        ),
    ] = "fashion-mnist",
    data_root: DataRoot = None,
    model: Annotated[
        str,
        typer.Option(
            help=f"Model name: {', '.join(MODEL_NAMES)}, one installed under the qrobust.models entry-point group, or your own as package.module:function (a function of the DatasetInfo and the --model-option keywords)."
        ),
    ] = "cnn",
    model_option: Annotated[
        list[str] | None, typer.Option(help="Model option KEY=VALUE, repeatable (e.g. depth=4 for mlp).")
    ] = None,
    init: Annotated[
        Path | None,
        typer.Option(
            help="Start from this checkpoint's model and weights (replaces --model, --model-option, --dataset)."
        ),
    ] = None,
    qat: Annotated[
        bool,
        typer.Option(
            help="Quantization-aware training (int8 weights, uint8 activations); convert with `qrobust quantize`."
        ),
    ] = False,
    input_margin: Annotated[
        int,
        typer.Option(
            help="With --qat: the int8 model reads noisy lattice inputs in [-M, 255 + M] instead of clipping them to [0, 255] (about 3 * sigma * 255 keeps large-sigma noise; 0: clip)."
        ),
    ] = 0,
    sigma: Annotated[float, typer.Option(help="Std of the noise augmentation, in [0, 1] pixel units (0: none).")] = 0.0,
    noise: Annotated[
        str, typer.Option(help="Noise kind: gaussian (for FloatRS) or discrete (uint8 lattice, for IntRS).")
    ] = "gaussian",
    loss: Annotated[
        str | None,
        typer.Option(
            help="Loss: natural, gaussian (natural on noisy inputs), pgd (Madry), trades, tradeoff (alpha * natural + beta * PGD). Default: gaussian if --sigma > 0, else natural."
        ),
    ] = None,
    alpha: Annotated[float, typer.Option(help="Weight of the natural loss in the trade-off loss.")] = 1.0,
    beta: Annotated[float, typer.Option(help="Weight of the robust term in trades and tradeoff.")] = 1.0,
    eps: Annotated[
        float, typer.Option(help="l_inf radius of the training adversaries, in [0, 1] pixel units.")
    ] = 0.031,
    step_size: Annotated[float, typer.Option(help="PGD step size of the training adversaries.")] = 0.007,
    attack_steps: Annotated[int, typer.Option(help="PGD steps of the training adversaries.")] = 10,
    quant: Annotated[
        str, typer.Option(help="Low-bit weights: none, bc (BinaryConnect) or br (Binary-Relax).")
    ] = "none",
    bits: Annotated[
        int,
        typer.Option(
            help="Weight bits with --quant, 1..8: 1 binary, 2 ternary, m >= 3 the 2^m - 1 levels -M..M, M = 2^(m-1) - 1 (4 bits: 15)."
        ),
    ] = 1,
    rho: Annotated[float, typer.Option(help="Binary-Relax: growth factor of lambda per epoch (> 1).")] = RHO,
    cutoff_epoch: Annotated[
        int, typer.Option(help="Binary-Relax: epochs of relaxation before pure projection (0: BinaryConnect).")
    ] = CUTOFF_EPOCH,
    epochs: Annotated[int, typer.Option(help="Number of epochs.")] = 90,
    batch_size: Annotated[int, typer.Option(help="Images per SGD step.")] = 256,
    lr: Annotated[float, typer.Option(help="Initial learning rate.")] = 0.1,
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = 0.9,
    weight_decay: Annotated[float, typer.Option(help="L2 weight decay.")] = 1e-4,
    lr_step: Annotated[int, typer.Option(help="Epochs between learning-rate drops.")] = 30,
    lr_gamma: Annotated[float, typer.Option(help="Factor applied to the learning rate at each drop.")] = 0.1,
    augment: Annotated[
        bool, typer.Option(help="Use the dataset's standard augmentation (crop + flip for CIFAR).")
    ] = True,
    train_subset: Annotated[
        int | None, typer.Option(help="Train on this many training images (seeded subset).")
    ] = None,
    test_subset: Annotated[int | None, typer.Option(help="Evaluate on this many test images (seeded subset).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of initialisation, shuffling, augmentation and noise (>= 0).")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted run saved in OUTPUT.")] = False,
    overwrite: Overwrite = False,
    device: Device = "auto",
) -> None:
    """Train a classifier (noise augmentation, adversarial losses, low-bit or int8 quantization-aware weights) and save a checkpoint."""
    check_device_name(device)
    check_counts(
        {
            "--epochs": epochs,
            "--batch-size": batch_size,
            "--lr-step": lr_step,
            "--attack-steps": attack_steps,
            "--bits": bits,
        },
        seed,
    )
    if quant != "none" and not 1 <= bits <= MAX_BITS:
        raise QRobustError(f"--bits must be in 1..{MAX_BITS}, got {bits}")
    check_outputs([output], overwrite=overwrite or resume, resumable=True)
    if input_margin and not qat:
        raise QRobustError("--input-margin applies to quantization-aware training: add --qat")
    from qrobust.recipes import train_checkpoint
    from qrobust.train import TrainConfig

    config = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        lr_step=lr_step,
        lr_gamma=lr_gamma,
        sigma=sigma,
        noise=noise,
        augment=augment,
        seed=seed,
        loss=loss,
        alpha=alpha,
        beta=beta,
        eps=eps,
        step_size=step_size,
        attack_steps=attack_steps,
        quant=quant,
        bits=bits,
        rho=rho,
        cutoff_epoch=cutoff_epoch,
    )
    if ":" in model:  # your own model's factory, needed by --init's checkpoint too
        import_model(model)
    result = train_checkpoint(
        output,
        config,
        model=model,
        model_options=parse_options(model_option or []),
        dataset=dataset,
        init=init,
        qat=qat,
        input_margin=input_margin,
        train_subset=train_subset,
        test_subset=test_subset,
        data_root=data_root,
        resume=resume,
        device=device,
        log=console.print,
    )
    if result.sparsity is not None:
        report = result.sparsity
        console.print(
            f"{bits}-bit weights: {100 * report.weight_sparsity:.2f}% of conv weights and "
            f"{100 * report.channel_sparsity:.2f}% of conv channels ({report.zero_channels}/{report.total_channels}) are zero"
        )
    noisy = "" if result.noisy is None else f", with {noise} noise sigma={sigma}: {100 * result.noisy:.2f}%"
    console.print(f"test accuracy: clean {100 * result.clean:.2f}%{noisy}  -> {output}")
