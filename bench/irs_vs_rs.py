"""Incremental randomized smoothing (IRS, Ugare et al., ICLR 2024) vs re-running RS on a modified model.

ARQ certifies every candidate quantized model of its search with IRS, reusing one certification of the
original model. Here, in one run, on Fashion-MNIST with a Gaussian-noise CNN (sigma 0.25):
  1. certify the original fp32 model once (n0, n, alpha): the cache, a one-off cost;
  2. make a modified model: a copy with every conv / linear weight rounded (``--weights``: int8 or int4, one
     scale per layer by ``qrobust.quant.lowbit_project``; int8-channel, the int8 engine's per-output-channel
     max-abs scales; or bfloat16 as in the IRS paper);
  3. certify the modified model with IRS (n_zeta replayed samples, alpha_zeta) once per ``--gamma`` and
     ``--n-fallback`` (the fresh samples of inputs whose cached pA_lower >= gamma: n_zeta as in the IRS
     paper, or the original's n to keep the confident inputs' large radii), and by re-running RS on it
     at each of ``--rs-samples`` (level alpha + alpha_zeta, the same overall confidence as IRS).
Printed: CPU and wall seconds of each, the ACR, certified accuracy, and the speed ratio RS / IRS; then, per
IRS variant, the smallest RS sample count whose ACR comes within 0.01 of IRS's (the IRS paper's way of
stating its speedup) and the comparison with re-running RS at the original's n.
CPU seconds (this process only) are the fair clock on a shared machine; run with OMP_NUM_THREADS=1.

Run from the repository root: ``OMP_NUM_THREADS=1 .venv/bin/python bench/irs_vs_rs.py [--checkpoint PATH]``
(e.g. runs/intrs/cnn-0.25.pt); without it a CNN is noise-trained first (``--epochs`` on ``--train-images``).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qrobust.data import LatticeDataset, dataset_info, load_dataset
from qrobust.models import build_model
from qrobust.models.inference import freeze_for_inference
from qrobust.quant import lowbit_project
from qrobust.quant.numerics import fake_quantize_affine
from qrobust.smoothing import (
    FloatRS,
    SmoothedClassifier,
    certify_incremental,
    certify_original,
    evenly_spaced,
    example_generator,
    summarize_certificates,
)
from qrobust.train import TrainConfig, accuracy, load_model, train

DATASET = "fashion-mnist"


def base_model(args: argparse.Namespace) -> tuple[nn.Module, float]:
    """The original fp32 model and its training sigma: loaded from ``--checkpoint`` or noise-trained here."""
    if args.checkpoint is not None:
        model, checkpoint = load_model(args.checkpoint)
        return model, float(checkpoint.metadata.get("sigma", args.sigma))
    info = dataset_info(DATASET)
    full = load_dataset(DATASET, "train")
    subset = torch.randperm(len(full), generator=torch.Generator().manual_seed(0))[: args.train_images]
    torch.manual_seed(0)
    model = build_model("cnn", info)
    config = TrainConfig(epochs=args.epochs, batch_size=128, lr=0.05, lr_step=max(1, args.epochs - 1), sigma=args.sigma)
    train(model, LatticeDataset(full.images[subset], full.labels[subset], info), config, progress=False)
    return model.eval(), args.sigma


WEIGHTS = {
    "int8": lambda w: lowbit_project(w, 8),
    "int8-channel": lambda w: fake_quantize_affine(w, None, torch.ones(()))[0],  # the int8 engine's weights
    "int4": lambda w: lowbit_project(w, 4),
    "bf16": lambda w: w.to(torch.bfloat16).float(),
}


def rounded_copy(model: nn.Module, weights: str) -> nn.Module:
    """``model`` with every conv and linear weight rounded to the ``weights`` format (biases stay float)."""
    modified = copy.deepcopy(model)
    with torch.no_grad():
        for layer in modified.modules():
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                layer.weight.copy_(WEIGHTS[weights](layer.weight))
    return modified.eval()


def timed(work: Callable[[], list]) -> tuple[list, float, float]:
    """``work()``'s result with the CPU seconds of this process and the wall seconds it took."""
    cpu, wall = time.process_time(), time.perf_counter()
    result = work()
    return result, time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="noise-trained fp32 CNN (else train one)")
    parser.add_argument("--sigma", type=float, default=0.25, help="noise level when the checkpoint does not say")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs without --checkpoint")
    parser.add_argument("--train-images", type=int, default=20_000, help="training subset without --checkpoint")
    parser.add_argument("--weights", choices=tuple(WEIGHTS), default="int8", help="weights of the modified model")
    parser.add_argument("--images", type=int, default=40, help="test images, evenly spaced")
    parser.add_argument("--n0", type=int, default=100, help="selection samples (original, RS and IRS fallback)")
    parser.add_argument("--n", type=int, default=10_000, help="estimation samples of the original certification")
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--n-zeta", type=int, default=1_000, help="IRS replayed samples")
    parser.add_argument("--n-fallback", default=None, help="comma-separated IRS fallback samples (default: n_zeta)")
    parser.add_argument("--alpha-zeta", type=float, default=0.001)
    parser.add_argument(
        "--gamma", default="0.99", help="comma-separated: IRS falls back to RS when cached pA_lower >= gamma"
    )
    parser.add_argument("--rs-samples", default="1000,2000,5000,10000", help="estimation samples of the RS re-runs")
    parser.add_argument("--batch-size", type=int, default=500)
    args = parser.parse_args()
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {args}",
        flush=True,
    )

    started = time.perf_counter()
    model, sigma = base_model(args)
    modified = rounded_copy(model, args.weights)
    test = load_dataset(DATASET, "test")
    print(
        f"model ready in {time.perf_counter() - started:.0f} s; sigma {sigma}; clean test accuracy: original "
        f"{accuracy(model, test):.4f}, {args.weights} copy {accuracy(modified, test):.4f}",
        flush=True,
    )
    indices = evenly_spaced(len(test), args.images)
    images, labels = test.images[indices], test.labels[indices].numpy()
    example = torch.rand(args.batch_size, *test.info.shape)
    original = SmoothedClassifier(freeze_for_inference(model, example), 10, FloatRS(sigma), args.batch_size)
    smoothed = SmoothedClassifier(freeze_for_inference(modified, example), 10, FloatRS(sigma), args.batch_size)

    cache, cpu, wall = timed(lambda: certify_original(original, images, n0=args.n0, n=args.n, alpha=args.alpha))
    rows = [("original (cache)", args.n, cache.certificates, cpu, wall)]
    print(f"original certified: {cpu:.1f} CPU s, {wall:.1f} wall s", flush=True)
    irs_rows = []
    n_fallbacks = [int(value) for value in (args.n_fallback or str(args.n_zeta)).split(",")]
    for gamma, n_fallback in itertools.product([float(value) for value in args.gamma.split(",")], n_fallbacks):
        irs, cpu, wall = timed(
            lambda gamma=gamma, n_fallback=n_fallback: certify_incremental(
                cache, smoothed, n_zeta=args.n_zeta, alpha_zeta=args.alpha_zeta, gamma=gamma, n_fallback=n_fallback
            )
        )
        irs_rows.append((f"IRS (gamma {gamma:g}, fallback n={n_fallback})", args.n_zeta, irs, cpu, wall))
        fallback = np.array([c.fallback for c in irs])
        zetas = np.array([c.zeta for c in irs if c.zeta is not None])
        print(
            f"IRS, gamma {gamma:g}, fallback n={n_fallback}: {cpu:.1f} CPU s, {wall:.1f} wall s; fallback on {fallback.sum()}/{len(irs)} "
            f"inputs; zeta on the incremental path: median {np.median(zetas) if zetas.size else float('nan'):.4f}, "
            f"max {zetas.max() if zetas.size else float('nan'):.4f}",
            flush=True,
        )
    rows += irs_rows
    level = args.alpha + args.alpha_zeta
    for n in (int(value) for value in args.rs_samples.split(",")):
        certificates, cpu, wall = timed(
            lambda n=n: [
                smoothed.certify(x, n0=args.n0, n=n, alpha=level, generator=example_generator(1, i))
                for i, x in enumerate(images)
            ]
        )
        rows.append((f"RS re-run (alpha {level:g})", n, certificates, cpu, wall))
        print(f"RS n={n}: {cpu:.1f} CPU s, {wall:.1f} wall s", flush=True)

    print(
        f"\n{len(images)} images, sigma {sigma}, modified = {args.weights} weights; original n0={args.n0} "
        f"n={args.n} alpha={args.alpha}; IRS n_zeta={args.n_zeta} alpha_zeta={args.alpha_zeta}"
    )
    print(
        f"{'certification':<36} {'samples':>7} {'CPU s':>8} {'wall s':>8} {'RS/IRS CPU':>10} {'ACR':>7} "
        f"{'cert acc r=0 / 0.25 / 0.5 / 0.75':>34}"
    )
    acrs = {}
    for name, samples, certificates, cpu, wall in rows:
        summary = summarize_certificates(certificates, labels, radii=(0.0, 0.25, 0.5, 0.75))
        acrs[name, samples] = summary.average_certified_radius
        accuracies = " / ".join(f"{a:.3f}" for a in summary.certified_accuracy)
        ratio = f"{cpu / irs_rows[0][3]:10.2f}" if name.startswith("RS") else " " * 10
        print(
            f"{name:<36} {samples:7d} {cpu:8.1f} {wall:8.1f} {ratio} {summary.average_certified_radius:7.4f} {accuracies:>34}"
        )
    reruns = [(n, cpu, acrs[name, n]) for name, n, _, cpu, _ in rows if name.startswith("RS")]
    for name, samples, _, irs_cpu, _ in irs_rows:
        irs_acr = acrs[name, samples]
        matching = [(n, cpu) for n, cpu, acr in reruns if acr >= irs_acr - 0.01]
        reached = f"n={min(matching)[0]}, {min(matching)[1] / irs_cpu:.2f}x its CPU time" if matching else "none"
        n, cpu, acr = reruns[-1]
        verdict = "met" if cpu / irs_cpu >= 1.3 and abs(acr - irs_acr) <= 0.01 else "not met"
        print(
            f"{name}: smallest RS re-run with ACR >= its ACR - 0.01: {reached}; vs RS re-run at n={n}: "
            f"{cpu / irs_cpu:.2f}x faster, ACR {acr - irs_acr:+.4f} in RS's favour "
            f"(goal: >= 1.3x faster with ACR within 0.01: {verdict})"
        )


if __name__ == "__main__":
    main()
