"""``attack``: accuracy under FGSM, IFGSM/PGD and Carlini-Wagner attacks, optionally of the smoothed model."""

from pathlib import Path
from typing import Annotated

import typer

from qrobust.cli.common import check_counts, import_model
from qrobust.cli.core import app, console
from qrobust.cli.options import DataRoot, Device, ModelFactory, NumExamples, Overwrite, Split
from qrobust.devices import check_device_name
from qrobust.errors import QRobustError
from qrobust.outputs import check_outputs, write_json_record

ATTACKS = ("fgsm", "ifgsm", "pgd", "pgd-l2", "cw")


@app.command("attack")
def attack_command(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            help="Checkpoint written by `qrobust train` (float, quantization-aware or low-bit): the model attacked."
        ),
    ],
    attack: Annotated[
        list[str] | None,
        typer.Option(help=f"Attack, repeatable: {', '.join(ATTACKS)} (default: fgsm, ifgsm, cw, the paper's A1-A3)."),
    ] = None,
    int8: Annotated[
        Path | None,
        typer.Option(
            help="Also evaluate this `qrobust quantize` int8 model on the same adversarial examples, crafted on CHECKPOINT (its fake-quant twin): a transfer attack."
        ),
    ] = None,
    eps: Annotated[float, typer.Option(help="l_inf radius of fgsm, ifgsm and pgd, in [0, 1] pixel units.")] = 0.031,
    eps_l2: Annotated[float, typer.Option(help="l2 radius of pgd-l2, in [0, 1] pixel units.")] = 0.5,
    steps: Annotated[int, typer.Option(help="Steps of ifgsm, pgd and pgd-l2.")] = 20,
    step_size: Annotated[
        float | None, typer.Option(help="Step of ifgsm/pgd (default 1/255) and pgd-l2 (default eps-l2 / 8).")
    ] = None,
    cw_lr: Annotated[float, typer.Option(help="Adam learning rate of C&W.")] = 0.01,
    cw_steps: Annotated[int, typer.Option(help="Adam steps of C&W per search round over c.")] = 100,
    cw_search_steps: Annotated[int, typer.Option(help="Rounds of C&W's binary search over c.")] = 5,
    sigma: Annotated[
        float,
        typer.Option(
            help="Attack the Gaussian-smoothed model instead: expectation of the base model over this much noise (0: attack the base model)."
        ),
    ] = 0.0,
    samples: Annotated[int, typer.Option(help="Noise draws per image with --sigma.")] = 8,
    num_examples: NumExamples = 1000,
    split: Split = "test",
    data_root: DataRoot = None,
    batch_size: Annotated[int, typer.Option(help="Images per attacked batch.")] = 256,
    seed: Annotated[int, typer.Option(help="Seed of the random starts and the noise.")] = 0,
    model: ModelFactory = None,
    output: Annotated[Path | None, typer.Option(help="JSON file for the accuracies and the run config.")] = None,
    overwrite: Overwrite = False,
    device: Device = "auto",
) -> None:
    """Natural accuracy and accuracy under FGSM, IFGSM/PGD (l_inf, l2) and Carlini-Wagner l2 attacks."""
    check_device_name(device)
    names = attack or ["fgsm", "ifgsm", "cw"]
    unknown = sorted(set(names) - set(ATTACKS))
    if unknown:
        raise QRobustError(f"unknown attack(s) {', '.join(unknown)}; choose from {', '.join(ATTACKS)}")
    check_counts(
        {"--steps": steps, "--samples": samples, "--num-examples": num_examples, "--batch-size": batch_size}, seed
    )
    check_outputs([] if output is None else [output], overwrite=overwrite)
    import torch
    from rich.table import Table

    from qrobust.attacks import FGSM, PGD, CarliniWagnerL2, ExpectationOverNoise, LatticeInputs, evaluate_attacks
    from qrobust.data import load_dataset
    from qrobust.devices import resolve_device
    from qrobust.quant import load_int8
    from qrobust.runner import example_indices
    from qrobust.train import load_model

    import_model(model)
    network, saved = load_model(checkpoint)
    network = network.to(resolve_device(device))  # the int8 model of --int8 stays on the CPU
    models = {checkpoint.name: network}
    if int8 is not None:
        models[int8.name] = LatticeInputs(load_int8(int8).model)
    source = (
        network
        if sigma == 0
        else ExpectationOverNoise(network, sigma, samples, generator=torch.Generator().manual_seed(seed))
    )
    generator = torch.Generator().manual_seed(seed)
    step = 1 / 255 if step_size is None else step_size
    builders = {
        "fgsm": lambda: FGSM(source, eps),
        "ifgsm": lambda: PGD(source, norm="inf", eps=eps, step_size=step, steps=steps, random_start=False),
        "pgd": lambda: PGD(source, norm="inf", eps=eps, step_size=step, steps=steps, generator=generator),
        "pgd-l2": lambda: PGD(
            source,
            norm="2",
            eps=eps_l2,
            step_size=eps_l2 / 8 if step_size is None else step_size,
            steps=steps,
            generator=generator,
        ),
        "cw": lambda: CarliniWagnerL2(source, lr=cw_lr, steps=cw_steps, search_steps=cw_search_steps),
    }
    attacks = {"natural": None} | {name: builders[name]() for name in dict.fromkeys(names)}
    data = load_dataset(saved.dataset_info.name, split, data_root)
    data = data.select(example_indices(len(data), num_examples, split))
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
        write_json_record(
            output,
            {
                "command": "attack",
                "checkpoint": str(checkpoint),
                "int8": None if int8 is None else str(int8),
                "attacks": {name: repr(value) for name, value in attacks.items()},
                "sigma": sigma,
                "samples": samples,
                "split": split,
                "examples": len(data),
                "seed": seed,
                "accuracy": accuracies,
                "model": saved.metadata,
            },
        )
        console.print(f"-> {output}")
