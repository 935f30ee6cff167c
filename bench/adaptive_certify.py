"""Adaptive vs fixed-N certification on the same int8 model, images and noise (issue #7 acceptance).

Certifies the same test images twice with IntRS: CERTIFY with a fixed N, and the sequential test of
``qrobust.smoothing.adaptive`` (the union-bound schedule; bench/sequential_certify.py compares it with
the confidence sequence) with at most N samples that stops once the table radii are settled. Both
read one shared noise bank, so the adaptive run sees a prefix of the fixed run's samples. Prints the
certified accuracy at each radius for both, the mean samples per image and the ratio, and writes them
as JSON.

The int8 model comes from bench/intrs_table2.sh (e.g. ``bench/intrs_table2.sh 0.25`` makes
runs/intrs/cnn-0.25.int8.pt). Committed run (results/scale/):
    OMP_NUM_THREADS=1 .venv/bin/python bench/adaptive_certify.py runs/intrs/cnn-0.25.int8.pt --sigma 0.25 \
        --images 500 --n 100000 --output results/scale/adaptive-intrs-0.25.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from qrobust.data import DatasetInfo, load_dataset
from qrobust.progress import progress_bar
from qrobust.quant import fast_backend, load_int8
from qrobust.smoothing import IntRS, SmoothedClassifier, evenly_spaced, example_generator
from qrobust.smoothing.adaptive import SampleSchedule, certify_adaptive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("int8", type=Path, help="int8 model file (qrobust quantize)")
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--n", type=int, default=100_000, help="fixed N, and the adaptive maximum")
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--radii", default="0,0.25,0.5,0.75")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    radii = tuple(float(r) for r in args.radii.split(","))

    saved = load_int8(args.int8)
    info = DatasetInfo.from_dict(saved.metadata["dataset"])
    data = load_dataset(info.name, "test")
    smoothed = SmoothedClassifier(
        fast_backend(saved.model), info.num_classes, IntRS(args.sigma), 256, noise_bank_seed=0
    )
    indices = evenly_spaced(len(data), args.images)
    schedule = SampleSchedule(args.n)
    runs = {"fixed": ([], 0.0, []), "adaptive": ([], 0.0, [])}
    with progress_bar() as bar:
        for name in runs:
            task = bar.add_task(name, total=len(indices), status="")
            certificates, started = [], time.perf_counter()
            for index in indices:
                x, generator = data.images[index], example_generator(0, index)
                if name == "fixed":
                    certificate = smoothed.certify(x, args.n0, args.n, args.alpha, generator)
                else:
                    certificate = certify_adaptive(
                        smoothed,
                        x,
                        n0=args.n0,
                        n_max=args.n,
                        alpha=args.alpha,
                        radii=radii,
                        sequential="union",
                        generator=generator,
                    )
                certificates.append(certificate)
                bar.update(task, advance=1)
            runs[name] = (certificates, time.perf_counter() - started, [c.samples for c in certificates])

    labels = data.labels[indices].numpy()
    record = {
        "model": str(args.int8),
        "sigma": args.sigma,
        "images": len(indices),
        "n0": args.n0,
        "n": args.n,
        "alpha": args.alpha,
        "checkpoints": list(schedule.checkpoints),
        "radii": list(radii),
    }
    for name, (certificates, seconds, samples) in runs.items():
        predicted = np.array([-1 if c.abstained else c.label for c in certificates])
        radius = np.array([c.radius for c in certificates])
        correct = predicted == labels
        record[name] = {
            "certified_accuracy": {f"{r:g}": 100 * float(np.mean(correct & (radius >= r))) for r in radii},
            "mean_samples": float(np.mean(samples)),
            "seconds": seconds,
        }
    record["samples_ratio"] = record["adaptive"]["mean_samples"] / record["fixed"]["mean_samples"]
    record["max_accuracy_gap"] = max(
        abs(record["adaptive"]["certified_accuracy"][k] - record["fixed"]["certified_accuracy"][k])
        for k in record["fixed"]["certified_accuracy"]
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{'':10}" + "".join(f"  r={r:<6g}" for r in radii) + "  mean samples   seconds")
    for name in runs:
        row = record[name]
        accuracy = "".join(f"  {row['certified_accuracy'][f'{r:g}']:6.1f}%" for r in radii)
        print(f"{name:10}{accuracy}  {row['mean_samples']:12.0f}  {row['seconds']:8.1f}")
    print(
        f"adaptive / fixed samples: {record['samples_ratio']:.3f}; "
        f"largest certified-accuracy gap: {record['max_accuracy_gap']:.1f} points  -> {args.output}"
    )


if __name__ == "__main__":
    main()
