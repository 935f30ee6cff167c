"""Tables 1-5 analog of the Binary-Relax / EnResNet / trade-off loss paper from `bench/robust_tables.sh` runs.

Usage: .venv/bin/python bench/robust_summary.py RUNS OUT
Reads OUT/attack-NAME.json (written by `qrobust attack`) and RUNS/NAME.pt (the checkpoints, for parameter
counts, sparsity and pruning); writes OUT/tables.md and OUT/natural-vs-robust.png.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from qrobust.models import count_parameters
from qrobust.quant import prune_channels, sparsity_report
from qrobust.train import load_model

PAPER_ATTACKS = {"natural": "N", "fgsm": "A1 FGSM", "ifgsm": "A2 IFGSM", "cw": "A3 C&W"}


def load_runs(runs: Path, out: Path) -> dict[str, dict]:
    """name -> accuracies, attacks, parameters, sparsity and pruned size of every attacked run."""
    table = {}
    for path in sorted(out.glob("attack-*.json")):
        name = path.stem.removeprefix("attack-")
        record = json.loads(path.read_text())
        model, checkpoint = load_model(runs / f"{name}.pt")
        report = sparsity_report(model)
        config = checkpoint.metadata["train_config"]
        table[name] = {
            "accuracy": next(iter(record["accuracy"].values())),
            "attacks": record["attacks"],
            "examples": record["examples"],
            "parameters": count_parameters(model),
            "pruned_parameters": count_parameters(prune_channels(model)),
            "sparsity": report,
            "config": config,
            "model": checkpoint.metadata["model"]
            + "".join(f" {k}={v}" for k, v in checkpoint.metadata["model_options"].items()),
        }
    return table


def accuracy_table(runs: dict[str, dict], names: list[str], columns: dict[str, str], extra=()) -> list[str]:
    """A markdown table: run, model, loss, quantization, extra columns, then accuracies (%) per attack."""
    names = [name for name in names if name in runs]
    if not names:
        return ["(no finished runs)"]
    header = ["run", "model", "params", "loss", "weights", *(title for title, _ in extra), *columns.values()]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        run, config = runs[name], runs[name]["config"]
        loss = config["loss"] + {
            "trades": f" beta={config['beta']:g}",
            "tradeoff": f" a={config['alpha']:g} b={config['beta']:g}",
        }.get(config["loss"], "")
        weights = (
            "float"
            if config["quant"] == "none"
            else f"{config['quant'].upper()} {({1: 'binary', 2: 'ternary'}).get(config['bits'], str(config['bits']) + '-bit')}"
        )
        cells = [name, run["model"], f"{run['parameters']:,}", loss, weights, *(value(run) for _, value in extra)]
        cells += [f"{100 * run['accuracy'][key]:.2f}" if key in run["accuracy"] else "-" for key in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(runs_dir: str, out_dir: str) -> None:
    runs, out = Path(runs_dir), Path(out_dir)
    results = load_runs(runs, out)
    examples = sorted({run["examples"] for run in results.values()})
    lines = [
        f"# Robust quantized networks on Fashion-MNIST (accuracy in %, {', '.join(map(str, examples))} test images)",
        "",
    ]
    lines += ["## Acceptance: adversarial training vs natural training (CNN, l_inf eps = 0.1)", ""]
    lines += accuracy_table(
        results, ["cnn-natural", "cnn-pgd"], {"natural": "natural", "fgsm": "FGSM", "pgd": "PGD-20"}
    )
    lines += ["", "## Tables 1-2: ResNet vs EnResNet, float vs BinaryConnect vs Binary-Relax (PGD training)", ""]
    binary = [f"{net}-{weights}-at" for net in ("resnet", "en1", "en2") for weights in ("float", "bc", "br")]
    lines += accuracy_table(results, binary, PAPER_ATTACKS)
    lines += ["", "## Tables 3-4: TRADES (eq. 7) vs trade-off loss (eq. 8), float and binary (Binary-Relax)", ""]
    losses = [f"en1-float-{loss}{beta}" for beta in (1, 4, 8) for loss in ("trades", "tradeoff")]
    losses += ["en1-float-at", "en1-br-at", "en1-br-tradeoff4", "en1-br-tradeoff8"]
    lines += accuracy_table(results, losses, PAPER_ATTACKS)
    sparsity = (
        ("weight sparsity", lambda run: f"{100 * run['sparsity'].weight_sparsity:.2f}%"),
        (
            "channel sparsity",
            lambda run: (
                f"{100 * run['sparsity'].channel_sparsity:.2f}% ({run['sparsity'].zero_channels}/{run['sparsity'].total_channels})"
            ),
        ),
        ("params after pruning", lambda run: f"{run['pruned_parameters']:,}"),
    )
    lines += ["", "## Table 5: ternary and 4-bit (Binary-Relax): sparsity and its structure", ""]
    lowbit = [f"en1-br{bits}-{loss}" for bits in (2, 4) for loss in ("natural", "at", "tradeoff8")]
    lines += accuracy_table(results, lowbit, dict(list(PAPER_ATTACKS.items())[:3]), sparsity)
    lines += ["", "Attacks (`qrobust attack`, as recorded in the JSON files):", ""]
    attacks = {
        f"{name}: `{attack}`" for run in results.values() for name, attack in run["attacks"].items() if attack != "None"
    }
    lines += [f"* {attack}" for attack in sorted(attacks)]
    (out / "tables.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(results, out / "natural-vs-robust.png")


def plot(results: dict[str, dict], path: Path) -> None:
    """Natural accuracy against IFGSM accuracy, one labelled point per run: the trade-off at a glance."""
    figure, axes = plt.subplots(figsize=(8, 6))
    for name, run in results.items():
        if "ifgsm" in run["accuracy"]:
            x, y = 100 * run["accuracy"]["natural"], 100 * run["accuracy"]["ifgsm"]
            marker = "o" if run["config"]["quant"] == "none" else "s"
            axes.scatter(x, y, marker=marker)
            axes.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes.set_xlabel("natural accuracy (%)")
    axes.set_ylabel("accuracy under IFGSM-20, eps 0.031 (%)")
    axes.set_title("Fashion-MNIST: natural vs robust accuracy (circles float, squares low-bit)")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"plot -> {path}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
