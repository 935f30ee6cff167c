"""Fixed n vs union-bound schedule vs confidence sequence, or lattice vs float-fp smoothing, on one model.

Issue #20's benches, on the same test images and noise (each arm of an image reads the noise stream of
``example_generator(seed, index)``, so the adaptive arms see a prefix of the fixed arm's samples):

* ``--mode sequential`` (default): CERTIFY with a fixed n, ``certify_adaptive`` with the union-bound
  schedule ("union") and with the confidence sequence ("cs"), both with at most n samples and deciding
  the table radii.
* ``--mode lattice``: CERTIFY of the fp32 checkpoint by float-fp smoothing and by lattice smoothing
  (``--method`` is ignored), fixed n: certified accuracy and time. Discrete Gaussian sampling is slower
  than ``torch.randn``; ``--noise-bank`` draws each arm's noise once (seeded by ``--seed``) so the times
  compare the model passes.

The arms run interleaved, image by image, and each (image, arm) appends one row to ``--output`` (TSV:
idx, label, arm, predict, radius, samples, seconds) as it finishes; rerunning the same command skips the
rows already there, so a killed run resumes. The summary (mean samples / n, certified accuracy per
radius, seconds per arm) is printed from the whole TSV. Runs for issue #20 (demo models, ``make demo``):

    OMP_NUM_THREADS=1 .venv/bin/python bench/sequential_certify.py runs/demo/cnn.int8.pt --method int \\
        --sigma 0.25 --output results/sequential/int-0.25.tsv
    OMP_NUM_THREADS=1 .venv/bin/python bench/sequential_certify.py runs/demo/cnn.pt --method float-fp \\
        --sigma 0.5 --radii 0,0.25,0.5,0.75,1,1.5 --output results/sequential/float-fp-0.5.tsv
    OMP_NUM_THREADS=1 .venv/bin/python bench/sequential_certify.py runs/demo/cnn.pt --mode lattice \\
        --sigma 0.25 --n 10000 --noise-bank --output results/sequential/lattice-0.25.tsv
"""

from __future__ import annotations

import argparse
import csv
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from qrobust.jobs import SmoothingJob
from qrobust.smoothing import Certificate, evenly_spaced, example_generator
from qrobust.smoothing.adaptive import certify_adaptive
from qrobust.smoothing.planner import unreachable_radii

HEADER = ("idx", "label", "arm", "predict", "radius", "samples", "seconds")
Arm = Callable[[torch.Tensor, torch.Generator], Certificate]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="model file: fp32 for float-fp / lattice, int8 for int / float-quant")
    parser.add_argument("--mode", choices=("sequential", "lattice"), default="sequential")
    parser.add_argument("--method", default="int", help="smoothing method of --mode sequential")
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--radii", default="0,0.25,0.5,0.75", help="table radii (the adaptive arms decide these)")
    parser.add_argument("--images", type=int, default=500, help="test images, evenly spaced")
    parser.add_argument("--n", type=int, default=100_000, help="fixed n, and the adaptive arms' maximum")
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--batch-size", type=int, default=1000, help="noisy samples per forward pass (= cs look)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--noise-bank", action="store_true", help="one noise bank for all images (sampling off the clock)"
    )
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--output", type=Path, required=True, help="TSV of per-image rows, appended to (resume)")
    args = parser.parse_args()
    radii = tuple(float(r) for r in args.radii.split(","))

    arms, data = _arms(args, radii)
    indices = evenly_spaced(len(data), args.images)
    done = {(int(row["idx"]), row["arm"]) for row in _read(args.output)}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fresh = not args.output.exists() or args.output.stat().st_size == 0
    with args.output.open("a") as out:
        if fresh:
            out.write("\t".join(HEADER) + "\n")
        for count, index in enumerate(indices, 1):
            for name, certify in arms.items():
                if (index, name) in done:
                    continue
                started = time.perf_counter()
                certificate = certify(data.images[index], example_generator(args.seed, index))
                seconds = time.perf_counter() - started
                predict = -1 if certificate.abstained else certificate.label
                row = (
                    index,
                    int(data.labels[index]),
                    name,
                    predict,
                    f"{certificate.radius:.6f}",
                    certificate.samples,
                    f"{seconds:.4f}",
                )
                out.write("\t".join(map(str, row)) + "\n")
                out.flush()
            print(f"\r{count}/{len(indices)} images", end="", flush=True)
    print()
    _summarize(_read(args.output), list(arms), radii, args.n)


def _arms(args: argparse.Namespace, radii: tuple[float, ...]) -> tuple[dict[str, Arm], object]:
    """The arms of the mode, by name, and the test split."""

    def job(method: str):
        return SmoothingJob(
            "certify",
            args.checkpoint,
            method,
            args.sigma,
            args.n,
            args.alpha,
            args.n0,
            noise_bank=args.noise_bank,
            batch_size=args.batch_size,
            data_root=args.data_root,
        ).open()

    def fixed(smoothed) -> Arm:
        return lambda x, generator: smoothed.certify(x, args.n0, args.n, args.alpha, generator)

    def adaptive(smoothed, sequential: str) -> Arm:
        return lambda x, generator: certify_adaptive(
            smoothed,
            x,
            n0=args.n0,
            n_max=args.n,
            alpha=args.alpha,
            radii=radii,
            sequential=sequential,
            generator=generator,
        )

    if args.mode == "lattice":
        (float_fp, data, _), (lattice, _, _) = job("float-fp"), job("lattice")
        return {"float-fp": fixed(float_fp), "lattice": fixed(lattice)}, data
    smoothed, data, _ = job(args.method)
    out_of_reach = unreachable_radii(smoothed.method, args.n, args.alpha, radii)
    if out_of_reach:
        print(f"warning: no input can certify radii {out_of_reach} with n = {args.n:,} at alpha = {args.alpha}")
    return {"fixed": fixed(smoothed), "union": adaptive(smoothed, "union"), "cs": adaptive(smoothed, "cs")}, data


def _read(path: Path) -> list[dict[str, str]]:
    """The complete rows of the TSV at ``path`` (none when absent; a line cut off mid-write is dropped)."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines(keepends=True)
    complete = [line for line in lines if line.endswith("\n")]
    return list(csv.DictReader(complete, delimiter="\t"))


def _summarize(rows: list[dict[str, str]], arms: list[str], radii: tuple[float, ...], n: int) -> None:
    """Per arm, over the images every arm has finished: samples / n, certified accuracy per radius, time."""
    by_arm = {arm: {int(r["idx"]): r for r in rows if r["arm"] == arm} for arm in arms}
    common = sorted(set.intersection(*(set(images) for images in by_arm.values())))
    print(f"{len(common)} images; certified accuracy (%) at each radius")
    print(f"{'arm':10}{'samples/n':>10}" + "".join(f"{f'r={r:g}':>9}" for r in radii) + f"{'seconds':>10}")
    for arm in arms:
        table = [by_arm[arm][i] for i in common]
        samples = np.array([int(r["samples"]) for r in table])
        correct = np.array([r["predict"] == r["label"] for r in table])
        radius = np.array([float(r["radius"]) for r in table])
        seconds = sum(float(r["seconds"]) for r in table)
        accuracy = "".join(f"{100 * np.mean(correct & (radius >= r)) if table else 0:9.1f}" for r in radii)
        print(f"{arm:10}{samples.mean() / n if table else 0:10.4f}{accuracy}{seconds:10.1f}")


if __name__ == "__main__":
    main()
