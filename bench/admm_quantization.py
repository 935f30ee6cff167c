"""Weng et al. (AAAI 2020) analogs on Fashion-MNIST (or --dataset): certified ADMM quantization vs plain ADMM vs LB, and
certified weight-perturbation bounds vs the fault sneaking attack.

- table (quantization.md / .tsv): test accuracy of MLPs of each --depths, quantized to each --bits by
  certified ADMM (eps_c = --percentile of the certified bounds), plain ADMM (no certificate) and LB
  (Leng et al. 2018), all from the SAME pre-trained float weights.
- fig1.png (+ fig1.tsv): test accuracy of the --fig-depth MLP vs the certificate percentile, per bits,
  with plain ADMM as the "no certificate" reference (the paper's Fig. 1, there on SVHN).
- fig2.png (+ fig2.tsv): train / test accuracy vs ADMM iteration for the three methods at --fig2-bits
  (the paper's Fig. 2).
- table1.md / .tsv: the --fsa-depth MLP, its --fsa-layers (default the last 4): accuracy before / after
  the fault sneaking attack, the certified bound (median over the certified images) and the attack's
  l_inf perturbation (the paper's Table 1); a layer where no radius was feasible shows the attempt that
  hit every target (marked "infeasible") with the share of kept images it kept.
Everything goes to --output, with config.json (the arguments and versions).

Default sizes run in about 15 minutes on 2 cores. Smoke run (a minute):
    .venv/bin/python bench/admm_quantization.py --output /tmp/admm-smoke --depths 4 --fig-depth 4 --fsa-depth 6 \\
        --bits 4 --percentiles 0,50,100 --epochs 1 --train-subset 5000 --iterations 2 --steps 20 --certify-images 20
Full run:
    OMP_NUM_THREADS=2 .venv/bin/python bench/admm_quantization.py --output results/admm
Table 1 only (see bench/fsa_table1.sh; about 20 minutes on one core), e.g. layers 7 and 8 alone:
    OMP_NUM_THREADS=1 .venv/bin/python bench/admm_quantization.py --output /tmp/fsa --only table1 --fsa-keep-fraction 0.95 --fsa-layers 7,8
The quantization table alone (Table A1 analog), at every depth of the paper:
    OMP_NUM_THREADS=1 .venv/bin/python bench/admm_quantization.py --output results/admm --only table --depths 2,4,6,8,10
The paper's other datasets, from files the user has (``qrobust.data.load_dataset`` formats) under --data-root:
    .venv/bin/python bench/admm_quantization.py --dataset mnist --data-root data --output results/admm-mnist
    .venv/bin/python bench/admm_quantization.py --dataset svhn --data-root data --output results/admm-svhn
    .venv/bin/python bench/admm_quantization.py --dataset cifar10 --data-root data --output results/admm-cifar10 --epochs 20
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

import qrobust
from qrobust.attacks import FaultSneakingAttack
from qrobust.data import DATASET_NAMES, LatticeDataset, load_dataset
from qrobust.models import build_model
from qrobust.quant.admm import ADMMConfig, ADMMResult, admm_quantize, certified_layer_bounds, quantizable_layers
from qrobust.smoothing import evenly_spaced
from qrobust.train import TrainConfig, accuracy, train

METHODS = {"certified ADMM": ("admm", True), "ADMM": ("admm", False), "LB": ("lb", False)}


def pretrain(depth: int, train_set: LatticeDataset, args) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    model = build_model("mlp", train_set.info, depth=depth, width=args.width)
    config = TrainConfig(
        epochs=args.epochs, batch_size=128, lr=args.lr, weight_decay=0.0, lr_step=max(args.epochs, 1), seed=args.seed
    )
    train(model, train_set, config, progress=False)
    return model.eval()


def certified_images(model, train_set: LatticeDataset, count: int) -> LatticeDataset:
    """``count`` evenly spaced training images the model classifies correctly (the paper uses 100)."""
    candidates = train_set.select(evenly_spaced(len(train_set), min(len(train_set), 10 * count)))
    with torch.no_grad():
        correct = (model(candidates.floats()).argmax(1) == candidates.labels).nonzero().flatten()
    return candidates.select(correct[evenly_spaced(len(correct), min(count, len(correct)))])


def quantize(model, train_set, test_set, bits: int, method: str, epsilons, args) -> ADMMResult:
    config = ADMMConfig(bits=bits, method=method, iterations=args.iterations, steps=args.steps, seed=args.seed)
    return admm_quantize(model, train_set, config, epsilons=epsilons, test_set=test_set, progress=True)


def percentile_radii(bounds: dict[str, torch.Tensor], percentile: float) -> dict[str, float]:
    """The ``percentile`` of each layer's certified bounds, by layer name (as ``admm_quantize`` takes them)."""
    return {name: float(np.percentile(bound.numpy(), percentile)) for name, bound in bounds.items()}


def write_table(path: Path, header: list[str], rows: list[list[str]]) -> None:
    """The same table as markdown (``path``) and TSV (``path`` with suffix .tsv)."""
    markdown = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(row) + " |" for row in rows
    ]
    path.write_text("\n".join(markdown) + "\n")
    path.with_suffix(".tsv").write_text("\n".join("\t".join(row) for row in [header, *rows]) + "\n")
    print("\n".join(markdown))


def plot(
    path: Path, curves: dict[str, tuple[list[float], list[float], str]], xlabel: str, title: str, xscale: str = "linear"
) -> None:
    """One PNG with a line per curve: name -> (x, y in %, line style)."""
    figure = Figure(figsize=(6.4, 4.2), dpi=120)
    axes = figure.add_subplot()
    for name, (x, y, style) in curves.items():
        axes.plot(x, y, style, label=name, marker="o" if len(x) < 12 else None, markersize=3)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("accuracy (%)")
    axes.set_xscale(xscale)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)


def table1(model: torch.nn.Module, train_set: LatticeDataset, test_set: LatticeDataset, args) -> None:
    """Table 1: certified bound vs fault sneaking perturbation, --fsa-layers (1-based) of the deep MLP."""
    started = time.perf_counter()
    chosen = certified_images(model, train_set, args.certify_images)
    names = [name for name, _ in quantizable_layers(model)]
    count = len(names)
    layers = list(range(count))[-4:] if args.fsa_layers is None else [int(k) - 1 for k in args.fsa_layers.split(",")]
    if not all(0 <= k < count for k in layers):
        raise SystemExit(f"--fsa-layers must be in 1..{count}, got {args.fsa_layers}")
    certified = certified_layer_bounds(model, chosen.floats(), chosen.labels)
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train_set), generator=generator)
    targets_set = train_set.select(order[: args.fsa_targets])
    keep_set = train_set.select(order[args.fsa_targets : args.fsa_targets + args.fsa_keep])
    with torch.no_grad():
        predicted = model(targets_set.floats()).argmax(1)
    targets = (predicted + 1 + torch.randint(9, predicted.shape, generator=generator)) % 10  # another class
    original = 100 * accuracy(model, test_set)
    header = ["", *(f"layer {k + 1}" for k in layers)]
    rows = [["original acc (%)", *([f"{original:.1f}"] * len(layers))]]
    after, bound, perturbation, success = [], [], [], []
    for k in layers:
        attack = FaultSneakingAttack(model, k, steps=args.fsa_steps, keep_fraction=args.fsa_keep_fraction)
        result = attack(targets_set.floats(), targets, keep_set.floats())
        after.append(f"{100 * accuracy(result.apply(model), test_set):.1f}")
        bound.append(f"{float(certified[names[k]].median()):.2g}")
        perturbation.append(f"{result.linf:.3g}" + ("" if result.feasible else " (infeasible)"))
        success.append(
            f"{int(result.success.sum())}/{len(targets)}, kept {100 * float(result.kept.float().mean()):.1f}%"
        )
        print(
            f"layer {k + 1} ({time.perf_counter() - started:.0f} s): radius {result.radius:.3g}, certified {bound[-1]}, attack l_inf {perturbation[-1]}, targets {success[-1]}, acc {after[-1]}%",
            flush=True,
        )
    rows += [
        ["acc after attack (%)", *after],
        ["certified bound (median)", *bound],
        ["attack perturbation (l_inf)", *perturbation],
        ["targets hit, kept", *success],
    ]
    write_table(args.output / "table1.md", header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True, help="directory for tables, figures and config.json")
    parser.add_argument("--dataset", choices=DATASET_NAMES, default="fashion-mnist")
    parser.add_argument(
        "--data-root", type=Path, default=None, help="where the dataset's files are (default: its usual place)"
    )
    parser.add_argument("--depths", default="8", help="comma-separated MLP depths of the quantization table")
    parser.add_argument("--fig-depth", type=int, default=8, help="MLP depth of Fig. 1 and Fig. 2")
    parser.add_argument(
        "--fsa-depth", type=int, default=10, help="MLP depth of Table 1 (its last 4 layers are attacked)"
    )
    parser.add_argument("--width", type=int, default=256, help="hidden units of every MLP")
    parser.add_argument("--bits", default="4,6,8", help="comma-separated weight bits")
    parser.add_argument("--percentile", type=float, default=50.0, help="certificate percentile of the table")
    parser.add_argument("--percentiles", default="0,10,25,50,75,90,100", help="certificate percentiles of Fig. 1")
    parser.add_argument("--fig2-bits", type=int, default=None, help="bits of Fig. 2 (default: the smallest of --bits)")
    parser.add_argument("--epochs", type=int, default=5, help="pre-training epochs")
    parser.add_argument("--lr", type=float, default=0.05, help="pre-training learning rate")
    parser.add_argument("--train-subset", type=int, default=None, help="training images (default: all 60,000)")
    parser.add_argument("--test-subset", type=int, default=2000, help="test images for every accuracy")
    parser.add_argument("--iterations", type=int, default=10, help="ADMM iterations")
    parser.add_argument("--steps", type=int, default=100, help="SGD steps per ADMM iteration")
    parser.add_argument(
        "--certify-images", type=int, default=100, help="training images the certificate percentiles are over"
    )
    parser.add_argument("--fsa-targets", type=int, default=4, help="images the fault sneaking attack relabels")
    parser.add_argument("--fsa-keep", type=int, default=500, help="training images whose predictions it keeps")
    parser.add_argument(
        "--fsa-keep-fraction",
        type=float,
        default=1.0,
        help="share of the kept images the attack must keep (FaultSneakingAttack keep_fraction)",
    )
    parser.add_argument(
        "--fsa-layers", default=None, help="comma-separated 1-based layers of Table 1 (default: the last 4)"
    )
    parser.add_argument(
        "--fsa-steps", type=int, default=1000, help="Adam steps per radius of the attack (FaultSneakingAttack steps)"
    )
    parser.add_argument(
        "--only",
        choices=("all", "table", "table1"),
        default="all",
        help="run everything, or only the quantization table or Table 1 (config goes to config-{table,table1}.json)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    bits_list = [int(b) for b in args.bits.split(",")]
    depths = [int(d) for d in args.depths.split(",")]
    percentiles = [float(p) for p in args.percentiles.split(",")]
    fig2_bits = min(bits_list) if args.fig2_bits is None else args.fig2_bits
    try:
        train_set = load_dataset(args.dataset, "train", args.data_root)
        test_set = load_dataset(args.dataset, "test", args.data_root).subset(args.test_subset, args.seed)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    args.output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    (args.output / ("config.json" if args.only == "all" else f"config-{args.only}.json")).write_text(
        json.dumps(
            vars(args)
            | {
                "output": str(args.output),
                "data_root": None if args.data_root is None else str(args.data_root),
                "versions": {
                    "qrobust": qrobust.__version__,
                    "torch": torch.__version__,
                    "python": platform.python_version(),
                },
            },
            indent=2,
        )
        + "\n"
    )

    if args.train_subset is not None:
        train_set = train_set.subset(args.train_subset, args.seed)
    if args.only == "table1":
        table1(pretrain(args.fsa_depth, train_set, args), train_set, test_set, args)
        print(f"done in {time.perf_counter() - started:.0f} s -> {args.output}")
        return
    models, bounds = {}, {}
    for depth in dict.fromkeys(depths if args.only == "table" else [*depths, args.fig_depth]):
        models[depth] = pretrain(depth, train_set, args)
        chosen = certified_images(models[depth], train_set, args.certify_images)
        bounds[depth] = certified_layer_bounds(models[depth], chosen.floats(), chosen.labels)
        print(
            f"{depth}-layer MLP: float test accuracy {100 * accuracy(models[depth], test_set):.2f}%, median certified "
            f"bound per layer " + ", ".join(f"{float(b.median()):.2g}" for b in bounds[depth].values())
        )

    # Table: every depth x bits x method, from the same pre-trained weights.
    results: dict[tuple[int, int, str], ADMMResult] = {}
    rows = []
    for depth in depths:
        for bits in bits_list:
            row = [str(depth), str(bits), f"{100 * accuracy(models[depth], test_set):.2f}"]
            for name, (method, certified) in METHODS.items():
                epsilons = percentile_radii(bounds[depth], args.percentile) if certified else None
                results[depth, bits, name] = quantize(models[depth], train_set, test_set, bits, method, epsilons, args)
                row.append(f"{100 * results[depth, bits, name].history[-1].test_accuracy:.2f}")
            rows.append(row)
    write_table(
        args.output / "quantization.md", ["layers", "bits", "float", *(f"{name} (%)" for name in METHODS)], rows
    )
    if args.only == "table":
        print(f"done in {time.perf_counter() - started:.0f} s -> {args.output}")
        return

    # Fig. 1: accuracy vs certificate percentile.
    depth = args.fig_depth
    fig1 = {}
    lines = ["bits\tpercentile\ttest_accuracy"]
    for color, bits in enumerate(bits_list):
        accuracies = []
        for percentile in percentiles:
            result = quantize(
                models[depth], train_set, test_set, bits, "admm", percentile_radii(bounds[depth], percentile), args
            )
            accuracies.append(100 * result.history[-1].test_accuracy)
            lines.append(f"{bits}\t{percentile:g}\t{accuracies[-1]:.2f}")
        plain = results.get((depth, bits, "ADMM")) or quantize(
            models[depth], train_set, test_set, bits, "admm", None, args
        )
        fig1[f"{bits} bits, certified"] = (percentiles, accuracies, f"C{color}-")
        fig1[f"{bits} bits, no certificate"] = (
            percentiles,
            [100 * plain.history[-1].test_accuracy] * len(percentiles),
            f"C{color}:",
        )
        lines.append(f"{bits}\tnone\t{100 * plain.history[-1].test_accuracy:.2f}")
    (args.output / "fig1.tsv").write_text("\n".join(lines) + "\n")
    plot(
        args.output / "fig1.png",
        fig1,
        "certificate percentile of eps_c",
        f"Quantized {depth}-layer MLP on {args.dataset}: test accuracy vs eps_c",
    )

    # Fig. 2: accuracy vs ADMM iteration.
    fig2, lines = {}, ["method\titeration\ttrain_accuracy\ttest_accuracy"]
    for color, (name, (method, certified)) in enumerate(METHODS.items()):
        result = results.get((depth, fig2_bits, name))
        if result is None:
            epsilons = percentile_radii(bounds[depth], args.percentile) if certified else None
            result = quantize(models[depth], train_set, test_set, fig2_bits, method, epsilons, args)
        x = [stats.iteration for stats in result.history]
        fig2[f"{name} train"] = (x, [100 * s.train_accuracy for s in result.history], f"C{color}--")
        fig2[f"{name} test"] = (x, [100 * s.test_accuracy for s in result.history], f"C{color}-")
        lines += [f"{name}\t{s.iteration}\t{s.train_accuracy:.4f}\t{s.test_accuracy:.4f}" for s in result.history]
    (args.output / "fig2.tsv").write_text("\n".join(lines) + "\n")
    plot(
        args.output / "fig2.png",
        fig2,
        "ADMM iteration",
        f"{fig2_bits}-bit {depth}-layer MLP: train (dashed) / test (solid)",
    )

    table1(models.get(args.fsa_depth) or pretrain(args.fsa_depth, train_set, args), train_set, test_set, args)
    print(f"done in {time.perf_counter() - started:.0f} s -> {args.output}")


if __name__ == "__main__":
    main()
