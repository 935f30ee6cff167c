"""Tables and plots of bench/arq_compare.sh: ARQ vs HAQ-style vs fixed precision at equal BitOPs budgets.

Writes to OUT: ``tables.md`` (per sigma: BitOPs %, ACR, certified accuracy at radii, search time, the
policy), ``ablations.md`` (the paper's Table 3, reward choice, and Table 4, IRS vs RS inside the search,
where bench/arq_compare.sh ran METHODS arq-cert / arq-rs; only if it did), ``acr-vs-bitops.png`` (ARQ paper, Fig. 1
analog), ``bits-per-layer.png`` (Fig. 2 analog), and copies each run's policy, search log, search time and
certification TSV to OUT/runs/.

Usage: .venv/bin/python bench/arq_summary.py [RUNS] [OUT] [MODEL]   (defaults: runs/arq results/arq cnn;
the fp32 models are runs/intrs/MODEL-SIGMA.pt, as for bench/arq_compare.sh)
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from qrobust.models.checkpoint import load_checkpoint
from qrobust.quant import BitPolicy, bitops_percent, layer_infos
from qrobust.smoothing import read_certify_tsv, summarize_rows

RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
METHODS = ("arq", "haq", "fixed", "arq-cert", "arq-rs")  # the last two: ablations, kept out of the plots
LABELS = {"arq": "ARQ (reward: ACR)", "haq": "HAQ-style (reward: noisy accuracy)", "fixed": "fixed precision"}


def main() -> None:
    runs = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/arq")
    out = Path(sys.argv[2] if len(sys.argv) > 2 else "results/arq")
    model = sys.argv[3] if len(sys.argv) > 3 else "cnn"
    (out / "runs").mkdir(parents=True, exist_ok=True)
    results: dict[float, list[dict]] = {}
    spelled: dict[float, str] = {}  # sigma as the file names spell it ("1.0")
    for directory in sorted(runs.glob("*-*-b*")):
        method, sigma, bits = re.fullmatch(r"([\w-]+?)-([\d.]+)-b(\d+)", directory.name).groups()
        if not (directory / "certify.tsv").exists():
            continue
        policy = BitPolicy.load(directory / "policy.json")
        checkpoint = load_checkpoint(f"runs/intrs/{model}-{sigma}.pt")
        layers = layer_infos(checkpoint.build(), checkpoint.dataset_info.shape)
        summary = summarize_rows(read_certify_tsv(directory / "certify.tsv"), RADII)
        seconds = directory / "search-seconds.txt"
        spelled[float(sigma)] = sigma
        results.setdefault(float(sigma), []).append(
            {
                "method": method,
                "bits": int(bits),
                "policy": policy,
                "bitops": bitops_percent(layers, policy),
                "acr": summary.average_certified_radius,
                "accuracy": summary.certified_accuracy,
                "search_seconds": float(seconds.read_text()) if seconds.exists() else None,
            }
        )
        for name in ("policy.json", "search.jsonl", "search-seconds.txt", "certify.tsv", "certify.json"):
            if (directory / name).exists():
                shutil.copy(directory / name, out / "runs" / f"{directory.name}-{name}")
    fp32 = {sigma: summarize_rows(read_certify_tsv(runs / f"fp32-{spelled[sigma]}.tsv"), RADII) for sigma in results}
    for sigma in fp32:
        shutil.copy(runs / f"fp32-{spelled[sigma]}.tsv", out / "runs" / f"fp32-{spelled[sigma]}-certify.tsv")

    lines = [
        f"# ARQ vs HAQ-style vs fixed precision (Fashion-MNIST, {model})",
        "",
        f"Made by `bench/arq_compare.sh` then `{_command()}`.",
        "",
    ]
    for sigma, rows in sorted(results.items()):
        rows.sort(key=lambda row: (row["bits"], METHODS.index(row["method"])))
        lines += [
            f"## sigma = {sigma:g}",
            "",
            "| budget | method | BitOPs % | ACR | "
            + " | ".join(f"r={r:g}" for r in RADII)
            + " | search s | weight bits | act bits |",
            "|---|---|---:|---:|" + "---:|" * len(RADII) + "---:|---|---|",
            f"| - | fp32 | 100 | {fp32[sigma].average_certified_radius:.3f} | "
            + " | ".join(f"{100 * a:.1f}" for a in fp32[sigma].certified_accuracy)
            + " | - | - | - |",
        ]
        for row in rows:
            search = "-" if row["search_seconds"] is None else f"{row['search_seconds']:.0f}"
            lines.append(
                f"| {row['bits']}-bit | {row['method']} | {row['bitops']:.3f} | {row['acr']:.3f} | "
                + " | ".join(f"{100 * a:.1f}" for a in row["accuracy"])
                + f" | {search} | {list(row['policy'].weight_bits)} | {list(row['policy'].act_bits)} |"
            )
        lines.append("")
    (out / "tables.md").write_text("\n".join(lines))
    if any(row["method"] in ("arq-cert", "arq-rs") for rows in results.values() for row in rows):
        (out / "ablations.md").write_text(_ablations(results, model))
    _plot_acr(results, fp32, out / "acr-vs-bitops.png")
    _plot_bits(results, out / "bits-per-layer.png")
    (out / "summary.json").write_text(
        json.dumps(
            {
                f"{s:g}": [{k: (v.to_dict() if k == "policy" else v) for k, v in row.items()} for row in rows]
                for s, rows in results.items()
            },
            indent=2,
            default=list,
        )
        + "\n"
    )
    print((out / "tables.md").read_text())


def _command() -> str:
    return " ".join([".venv/bin/python bench/arq_summary.py", *sys.argv[1:]])


def _ablations(results, model: str) -> str:
    """Markdown of the two ablations: rewards compared where arq-cert ran (Table 3), IRS vs plain RS as
    the search's certifier where arq-rs ran (Table 4); ACR and certified accuracy on the test images."""
    tables = {
        "Table 3 analog: the reward (ACR; certified accuracy at r = 0.5; noisy validation accuracy)": (
            "arq-cert",
            ("arq", "arq-cert", "haq"),
        ),
        "Table 4 analog: IRS vs re-running RS (same samples per image) inside the search": (
            "arq-rs",
            ("arq", "arq-rs"),
        ),
    }
    lines = [
        f"# ARQ ablations (Fashion-MNIST, {model})",
        "",
        f"Made by `bench/arq_compare.sh` (METHODS=arq-cert / arq-rs) then `{_command()}`.",
        "",
    ]
    for title, (marker, methods) in tables.items():
        lines += [
            f"## {title}",
            "",
            "| sigma | budget | method | BitOPs % | ACR | " + " | ".join(f"r={r:g}" for r in RADII) + " | search s |",
            "|---|---|---|---:|---:|" + "---:|" * (len(RADII) + 1),
        ]
        for sigma, rows in sorted(results.items()):
            for bits in sorted({row["bits"] for row in rows if row["method"] == marker}):
                for row in sorted(
                    (r for r in rows if r["bits"] == bits and r["method"] in methods),
                    key=lambda r: methods.index(r["method"]),
                ):
                    search = "-" if row["search_seconds"] is None else f"{row['search_seconds']:.0f}"
                    lines.append(
                        f"| {sigma:g} | {bits}-bit | {row['method']} | {row['bitops']:.3f} | {row['acr']:.3f} | "
                        + " | ".join(f"{100 * a:.1f}" for a in row["accuracy"])
                        + f" | {search} |"
                    )
        lines.append("")
    return "\n".join(lines)


def _plot_acr(results, fp32, path: Path) -> None:
    """ACR against BitOPs %, one panel per sigma, fp32 as a dashed line (ARQ paper, Fig. 1)."""
    figure = Figure(figsize=(4 * len(results), 3.6), dpi=120)
    for panel, (sigma, rows) in enumerate(sorted(results.items()), start=1):
        axes = figure.add_subplot(1, len(results), panel)
        for method, marker in zip(LABELS, "o^s", strict=True):
            points = sorted((row["bitops"], row["acr"]) for row in rows if row["method"] == method)
            if points:
                axes.plot(*np.array(points).T, marker=marker, label=LABELS[method])
        axes.axhline(fp32[sigma].average_certified_radius, color="gray", linestyle="--", label="fp32")
        axes.set_title(f"sigma = {sigma:g}")
        axes.set_xlabel("BitOPs (% of fp32)")
        axes.set_ylabel("ACR")
        axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)


def _plot_bits(results, path: Path) -> None:
    """Bits per layer of the searched policies (weights: dots, activations: crosses), ARQ paper Fig. 2."""
    searched = [
        (sigma, row) for sigma, rows in sorted(results.items()) for row in rows if row["method"] in ("arq", "haq")
    ]
    figure = Figure(figsize=(7, 3.2 + 0.2 * len(searched)), dpi=120)
    axes = figure.add_subplot()
    for offset, (sigma, row) in enumerate(searched):
        layers = np.arange(len(row["policy"].weight_bits)) + 0.06 * (offset - len(searched) / 2)
        (line,) = axes.plot(
            layers, row["policy"].weight_bits, "o-", label=f"{row['method']} sigma={sigma:g} {row['bits']}-bit budget"
        )
        axes.plot(layers, row["policy"].act_bits, "x--", color=line.get_color())
    axes.set_xlabel("layer (first and last fixed at 8 bits)")
    axes.set_ylabel("bits (o weights, x activations)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=6, ncol=2)
    figure.tight_layout()
    figure.savefig(path)


if __name__ == "__main__":
    main()
