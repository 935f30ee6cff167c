"""GPU check: train one epoch on CUDA, certify the same images on CUDA and on the CPU, compare.

Trains the registry CNN for one epoch with Gaussian noise (sigma) on Fashion-MNIST (digits when
/usr/share/datasets/fashion-mnist is absent) on the GPU, then certifies the first ``--images`` test
images with FloatRS-fp on CUDA and on the CPU with the same seed, twice: with the per-example noise
streams (each device draws its own noise from the seed, so labels and radii agree statistically) and
with one shared noise bank (the same noise on both devices, so they differ only by float rounding).
Prints the agreement and the speed of each. Without a GPU it says so and exits with code 2, unless
``--cpu-only`` runs the CPU half alone. Usage::

    .venv/bin/python bench/device_check.py            # on a machine with a CUDA GPU
    .venv/bin/python bench/device_check.py --cpu-only # anywhere: the CPU half
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

import qrobust as qr
from qrobust.errors import DatasetNotFoundError
from qrobust.smoothing import certify_examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20, help="test images to certify on each device")
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--batch-size", type=int, default=1000, help="noisy samples per forward pass")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu-only", action="store_true", help="without a GPU, run the CPU half alone")
    args = parser.parse_args()

    gpu = torch.cuda.is_available()
    if not gpu and not args.cpu_only:
        print(
            f"no CUDA GPU: torch {torch.__version__} sees none, so there is nothing to compare; "
            "run this on a machine with a GPU (or pass --cpu-only for the CPU half)",
            file=sys.stderr,
        )
        sys.exit(2)
    devices = ["cuda", "cpu"] if gpu else ["cpu"]
    print(
        f"torch {torch.__version__}; devices: {', '.join(devices)}"
        + (f" ({torch.cuda.get_device_name()})" if gpu else " (no CUDA GPU: the CPU half only)")
    )

    try:
        train_set, test_set = qr.load_dataset("fashion-mnist", "train"), qr.load_dataset("fashion-mnist", "test")
    except DatasetNotFoundError:
        train_set, test_set = qr.load_dataset("digits", "train"), qr.load_dataset("digits", "test")
    info = train_set.info
    torch.manual_seed(args.seed)
    model = qr.build_model("cnn", info)
    config = qr.TrainConfig(epochs=1, batch_size=256, lr=0.05, sigma=args.sigma, seed=args.seed)
    started = time.perf_counter()
    qr.train(model, train_set, config, progress=False, device=devices[0])
    _sync()
    seconds = time.perf_counter() - started
    print(
        f"{info.name}: trained one epoch on {len(train_set)} images on {devices[0]} in {seconds:.1f} s; "
        f"clean test accuracy {qr.accuracy(model, test_set, device=devices[0]):.4f}"
    )

    indices = range(min(args.images, len(test_set)))
    for bank in (False, True):
        rows = {}
        for device in devices:
            base = model.to(device)
            smoothed = qr.SmoothedClassifier(
                base, info.num_classes, qr.FloatRS(args.sigma), args.batch_size, args.seed if bank else None
            )
            started = time.perf_counter()
            rows[device] = list(
                certify_examples(smoothed, test_set, indices, n0=args.n0, n=args.n, alpha=args.alpha, seed=args.seed)
            )
            _sync()
            seconds = time.perf_counter() - started
            certified = np.mean([row.correct for row in rows[device]])
            print(
                f"{'noise bank' if bank else 'own streams'}: {device}: {len(indices)} images, n = {args.n} in "
                f"{seconds:.1f} s ({len(indices) * (args.n0 + args.n) / seconds:,.0f} samples/s), "
                f"certified correct {certified:.2f}"
            )
        if gpu:
            gpu_rows, cpu_rows = rows["cuda"], rows["cpu"]
            same = np.mean([a.predict == b.predict for a, b in zip(gpu_rows, cpu_rows)])
            gap = max(abs(a.radius - b.radius) for a, b in zip(gpu_rows, cpu_rows))
            print(
                f"{'noise bank' if bank else 'own streams'}: cuda vs cpu: same label on {same:.0%} of the "
                f"images, largest radius difference {gap:.4f}"
            )


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
