"""``finetune``: quantize with a mixed-precision bit policy (from ``search``) and fine-tune with noise."""

from pathlib import Path
from typing import Annotated

import typer

from qrobust.cli.common import check_counts, float_model
from qrobust.cli.core import app, console
from qrobust.cli.options import DataRoot, Device, ModelFactory, Overwrite
from qrobust.devices import check_device_name
from qrobust.errors import QRobustError
from qrobust.outputs import check_outputs


@app.command("finetune")
def finetune_command(
    checkpoint: Annotated[
        Path, typer.Argument(help="Float checkpoint written by `qrobust train`: the model to quantize.")
    ],
    policy: Annotated[
        Path, typer.Option(help="Bit policy JSON written by `qrobust search` (policy.json, fixed-policy.json).")
    ],
    sigma: Annotated[float, typer.Option(help="Std of the Gaussian noise augmentation, in [0, 1] pixel units (> 0).")],
    output: Annotated[
        Path,
        typer.Option(help="Checkpoint to write (.pt), rewritten after every epoch; certify it with --method float-fp."),
    ],
    epochs: Annotated[int, typer.Option(help="Fine-tuning epochs (ARQ: 10).")] = 10,
    lr: Annotated[float, typer.Option(help="Initial learning rate (ARQ: 0.01).")] = 0.01,
    lr_step: Annotated[int, typer.Option(help="Epochs between learning-rate drops by 10x (ARQ: 5).")] = 5,
    batch_size: Annotated[int, typer.Option(help="Images per SGD step.")] = 256,
    calibration_images: Annotated[
        int, typer.Option(help="Noisy training images the clips are calibrated on first.")
    ] = 512,
    train_subset: Annotated[
        int | None, typer.Option(help="Fine-tune on this many training images (seeded subset).")
    ] = None,
    data_root: DataRoot = None,
    seed: Annotated[int, typer.Option(help="Seed of shuffling, noise and the calibration draw.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted run saved in OUTPUT.")] = False,
    model: ModelFactory = None,
    overwrite: Overwrite = False,
    device: Device = "auto",
) -> None:
    """Quantize a float checkpoint with a mixed-precision bit policy and fine-tune it with Gaussian noise."""
    if not sigma > 0:
        raise QRobustError(f"sigma must be > 0, got {sigma}")
    check_device_name(device)
    check_counts(
        {
            "--epochs": epochs,
            "--lr-step": lr_step,
            "--batch-size": batch_size,
            "--calibration-images": calibration_images,
        },
        seed,
    )
    check_outputs([output], overwrite=overwrite or resume, resumable=True)
    if not policy.is_file():
        raise QRobustError(f"policy file not found: {policy}")
    import torch

    from qrobust.data import load_dataset
    from qrobust.models.checkpoint import load_checkpoint, model_metadata, save_checkpoint
    from qrobust.quant.bitops import BitPolicy, bitops_percent, layer_infos
    from qrobust.search import finetune_policy
    from qrobust.train import TrainConfig, accuracy

    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, lr_step=lr_step, sigma=sigma, seed=seed)
    try:
        bit_policy = BitPolicy.load(policy)
    except UnicodeDecodeError:
        raise QRobustError(f"{policy} is not a JSON bit policy: it is not text") from None
    network, saved = float_model(checkpoint, "finetune", model)
    info = saved.dataset_info
    layers = layer_infos(network, info.shape)
    if len(layers) != bit_policy.num_layers:
        raise QRobustError(
            f"{policy} has {bit_policy.num_layers} layers but {saved.metadata['model']} in {checkpoint} has {len(layers)}: a policy for another model"
        )
    train_set = load_dataset(info.name, "train", data_root)
    train_set = train_set if train_subset is None else train_set.subset(train_subset, seed)
    percent = bitops_percent(layers, bit_policy)
    console.print(
        f"{saved.metadata['model']} with weights {list(bit_policy.weight_bits)}, activations "
        f"{list(bit_policy.act_bits)} bits ({percent:.2f}% BitOPs): {epochs} epochs on {len(train_set)} images, sigma {sigma}"
    )
    metadata = model_metadata(
        saved.metadata["model"],
        saved.metadata["model_options"],
        info,
        sigma=sigma,
        noise="gaussian",
        seed=seed,
        source=str(checkpoint),
        bitops_percent=percent,
    )
    mixed = finetune_policy(
        network,
        bit_policy,
        train_set,
        config,
        calibration_images=calibration_images,
        checkpoint_path=output,
        metadata=metadata,
        resume=resume,
        progress=True,
        device=device,
    )
    test_set = load_dataset(info.name, "test", data_root)
    test_set = test_set.subset(min(1000, len(test_set)), seed)
    clean = accuracy(mixed, test_set)
    noisy = accuracy(mixed, test_set, noise=config.noise_method(), generator=torch.Generator().manual_seed(seed))
    written = load_checkpoint(output)
    written.metadata["accuracy"] = {"clean": clean, "noisy": noisy, "test_images": len(test_set)}
    save_checkpoint(output, written)
    console.print(
        f"test accuracy: clean {100 * clean:.2f}%, with Gaussian noise sigma={sigma}: {100 * noisy:.2f}%  -> {output}"
    )
