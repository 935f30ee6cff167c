"""``search``: per-layer bit-widths under a BitOPs budget by a DDPG agent (ARQ)."""

from pathlib import Path
from typing import Annotated

import typer

from qrobust.cli.common import check_counts, float_model
from qrobust.cli.core import app, console
from qrobust.cli.options import Alpha, DataRoot, Device, ModelFactory, Sigma
from qrobust.devices import check_device_name
from qrobust.outputs import check_writable, write_json_record

# qrobust.search.SearchConfig's defaults (and qrobust.search.arq.DEFAULT_WARMUP), as plain values for --help
EPISODES, REWARD, REWARD_RADIUS, CERTIFIER, WARMUP = 40, "arq", 0.5, "irs", 10
FINETUNE_IMAGES, FINETUNE_LR, VALIDATION_IMAGES, BATCH_SIZE = 5000, 0.01, 100, 256
N0, N, N_ZETA, ALPHA, ALPHA_ZETA, GAMMA = 100, 4000, 500, 0.001, 0.001, 0.99


@app.command("search")
def search_command(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            help="Float checkpoint written by `qrobust train`, noise-trained at --sigma: the model whose bit-widths are searched."
        ),
    ],
    sigma: Sigma,
    budget: Annotated[
        float,
        typer.Option(
            help="BitOPs limit in percent of the fp32 model's, in (0, 100] (uniform 4 bits costs about 1.6%)."
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            help="Directory for policy.json (best policy), search.jsonl (one line per episode; an existing one is resumed), best.pt (its fine-tuned quantized checkpoint), fixed-policy.json (the uniform baseline) and config.json."
        ),
    ] = Path("search"),
    episodes: Annotated[
        int, typer.Option(help="Search episodes in all (a resumed search counts the logged ones).")
    ] = EPISODES,
    reward: Annotated[
        str,
        typer.Option(
            help="arq (ACR of the quantized smoothed model minus the original's), certified (certified accuracy at --reward-radius minus the original's) or haq (accuracy of the quantized model on noisy validation images)."
        ),
    ] = REWARD,
    reward_radius: Annotated[
        float, typer.Option(help="l2 radius of the certified reward, in [0, 1] pixel units.")
    ] = REWARD_RADIUS,
    certifier: Annotated[
        str,
        typer.Option(
            help="irs (incremental, reusing the original's certificates) or rs (plain smoothing with --n-zeta samples) for each candidate."
        ),
    ] = CERTIFIER,
    warmup: Annotated[int, typer.Option(help="Episodes of random actions before the agent learns.")] = WARMUP,
    finetune_images: Annotated[
        int, typer.Option(help="Training images (n1) of each policy's one-epoch noisy fine-tuning.")
    ] = FINETUNE_IMAGES,
    finetune_lr: Annotated[
        float, typer.Option(help="Learning rate of that fine-tuning (SGD, momentum 0.9).")
    ] = FINETUNE_LR,
    validation_images: Annotated[
        int, typer.Option(help="Held-out training images the reward is measured on.")
    ] = VALIDATION_IMAGES,
    n0: Annotated[
        int, typer.Option(help="Noisy samples to guess the top class (original certification and IRS fallback).")
    ] = N0,
    n: Annotated[int, typer.Option(help="Noisy samples of the original model's certification, done once.")] = N,
    n_zeta: Annotated[
        int, typer.Option(help="Noisy samples per image certifying each quantized model (IRS), <= --n.")
    ] = N_ZETA,
    alpha: Alpha = ALPHA,
    alpha_zeta: Annotated[
        float, typer.Option(help="Failure probability of IRS's disagreement bound, in (0, 1).")
    ] = ALPHA_ZETA,
    gamma: Annotated[
        float, typer.Option(help="IRS certifies from scratch where the original's pA_lower >= gamma.")
    ] = GAMMA,
    batch_size: Annotated[
        int, typer.Option(help="Images per SGD step and noisy samples per forward pass.")
    ] = BATCH_SIZE,
    data_root: DataRoot = None,
    seed: Annotated[int, typer.Option(help="Seed of the agent, the image draws, the fine-tuning and the noise.")] = 0,
    model: ModelFactory = None,
    device: Device = "auto",
) -> None:
    """Search per-layer weight/activation bit-widths under a BitOPs budget (ARQ, Yang et al. 2025): a DDPG
    agent rewarded by the certified radius of the fine-tuned quantized smoothed model."""
    check_device_name(device)
    check_counts(
        {
            "--episodes": episodes,
            "--finetune-images": finetune_images,
            "--validation-images": validation_images,
            "--n0": n0,
            "--n": n,
            "--n-zeta": n_zeta,
            "--batch-size": batch_size,
        },
        seed,
    )
    from qrobust.data import load_dataset
    from qrobust.models.checkpoint import model_metadata
    from qrobust.search import DDPGConfig, PolicySearch, SearchConfig, describe

    config = SearchConfig(
        sigma=sigma,
        budget=budget,
        episodes=episodes,
        reward=reward,
        certifier=certifier,
        reward_radius=reward_radius,
        finetune_images=finetune_images,
        finetune_lr=finetune_lr,
        batch_size=batch_size,
        validation_images=validation_images,
        n0=n0,
        n=n,
        n_zeta=n_zeta,
        alpha=alpha,
        alpha_zeta=alpha_zeta,
        gamma=gamma,
        seed=seed,
        agent=DDPGConfig(warmup_episodes=warmup, seed=seed),
    )
    check_writable(output)
    network, saved = float_model(checkpoint, "search", model)
    log = output / "search.jsonl"
    search = PolicySearch(
        network, load_dataset(saved.dataset_info.name, "train", data_root), config, device=device
    )  # checks the budget
    console.print(
        ("resuming " if log.exists() else "") + f"{reward} search over {saved.metadata['model']} at "
        f"{budget:g}% BitOPs, sigma {sigma}"
        + (
            ""
            if reward == "haq"
            else f"; certifying the original smoothed model on {validation_images} images first (n0 {n0}, n {n})"
        )
    )
    write_json_record(
        output / "config.json",
        {"command": "search", "checkpoint": str(checkpoint), **config.to_dict(), "model": saved.metadata},
    )
    search.fixed_policy.save(output / "fixed-policy.json")
    metadata = model_metadata(
        saved.metadata["model"],
        saved.metadata["model_options"],
        saved.dataset_info,
        sigma=sigma,
        noise="gaussian",
        source=str(checkpoint),
    )
    result = search.run(log, best_checkpoint=output / "best.pt", metadata=metadata, progress=True)
    result.best.policy.save(output / "policy.json")
    original = "" if result.acr_original is None else f" (original ACR {result.acr_original:.3f})"
    console.print(f"best: {describe(result.best)}{original}  -> {output / 'policy.json'}, {output / 'best.pt'}")
