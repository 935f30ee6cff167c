"""Certification speed, measured side by side in one run (IntRS issue, efficiency benchmark).

For ResNet-20 (3x32x32) and the small CNN (1x28x28), random weights (timing does not depend on them):
  (a) FloatRS-fp, eager fp32, the way Cohen et al.'s reference code certifies;
  (b) FloatRS-fp on qrobust's fast fp32 path (frozen TorchScript);
  (c) IntRS-quant: discrete noise on the uint8 lattice, int8 model on the fast int8 backend.
Each certifies the same images with the same n0 and n; the figure is the whole pipeline (noise, inference,
counting). Also printed: the raw forward throughput of each base model on one pre-made batch, the share of
it the pipeline keeps, and the size of the fp32 and int8 model files.

Run from the repository root: ``.venv/bin/python bench/certify_speed.py [--n 100000] [--images 2]``.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from qrobust.data import dataset_info
from qrobust.models import build_model
from qrobust.models.inference import freeze_for_inference
from qrobust.progress import progress_bar
from qrobust.quant import calibrate, convert, fast_backend, prepare_qat, save_int8
from qrobust.smoothing import FloatRS, IntRS, SmoothedClassifier

MODELS = (("resnet20", "cifar10"), ("cnn", "fashion-mnist"))
SIGMA = 0.25


def variants(name: str, dataset: str, batch_size: int):
    """(label, base model, smoothing method) for (a), (b), (c), and the file sizes of the fp32 and int8 models."""
    info = dataset_info(dataset)
    torch.manual_seed(0)
    model = build_model(name, info).eval()
    calibration = IntRS(SIGMA).perturb(
        torch.randint(0, 256, (256, *info.shape), dtype=torch.uint8), torch.Generator().manual_seed(0)
    )
    int8 = convert(calibrate(prepare_qat(model), calibration))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    with tempfile.TemporaryDirectory() as directory:
        int8_size = save_int8(Path(directory) / "model.int8.pt", int8)
    frozen = freeze_for_inference(model, torch.rand(batch_size, *info.shape))
    runs = [
        ("(a) FloatRS-fp, eager fp32", model, FloatRS(SIGMA)),
        ("(b) FloatRS-fp, frozen fp32", frozen, FloatRS(SIGMA)),
        ("(c) IntRS-quant, fast int8", fast_backend(int8), IntRS(SIGMA)),
    ]
    return info, runs, buffer.getbuffer().nbytes, int8_size


@torch.inference_mode()
def forward_throughput(base, method, shape, batch_size: int, seconds: float = 3.0) -> float:
    """Images per second of ``base`` alone on one pre-made noisy batch."""
    batch = method.perturb(
        torch.randint(0, 256, (batch_size, *shape), dtype=torch.uint8), torch.Generator().manual_seed(1)
    )
    base(batch)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        base(batch)
        done += batch_size
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="estimation samples per image")
    parser.add_argument("--n0", type=int, default=100, help="selection samples per image")
    parser.add_argument("--images", type=int, default=2, help="images certified per variant")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--noise-bank",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="draw each variant's noise once and reuse it (timed once per variant, outside the per-image figure)",
    )
    parser.add_argument(
        "--models", default=",".join(name for name, _ in MODELS), help="comma-separated subset of resnet20,cnn"
    )
    args = parser.parse_args()
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; n0={args.n0}, n={args.n}, {args.images} images, batch {args.batch_size}"
    )
    for name, dataset in MODELS:
        if name not in args.models.split(","):
            continue
        info, runs, fp32_size, int8_size = variants(name, dataset, args.batch_size)
        images = torch.randint(
            0, 256, (args.images + 1, *info.shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(2)
        )
        bank_seed = 4 if args.noise_bank else None
        smoothers = {
            label: SmoothedClassifier(base, info.num_classes, method, args.batch_size, bank_seed)
            for label, base, method in runs
        }
        seconds: dict[str, list[float]] = {label: [] for label in smoothers}
        setup: dict[str, float] = {}
        with progress_bar() as bar:
            task = bar.add_task(name, total=(args.images + 1) * len(runs), status="")
            for index, image in enumerate(images):  # interleave the variants so machine load hits them alike
                for label, smoothed in smoothers.items():
                    start = time.perf_counter()
                    smoothed.certify(
                        image, n0=args.n0, n=args.n, alpha=0.001, generator=torch.Generator().manual_seed(3)
                    )
                    # the first image pays the once-per-run costs: the noise bank and IntRS's radius table
                    if index:
                        seconds[label].append(time.perf_counter() - start)
                    else:
                        setup[label] = time.perf_counter() - start
                    bar.update(task, advance=1, status=label)
        print(
            f"\n## {name} ({'x'.join(map(str, info.shape))}): fp32 weights {fp32_size / 1024:.0f} KiB, "
            f"int8 file {int8_size / 1024:.0f} KiB ({100 * int8_size / fp32_size:.0f}%)"
        )
        print(
            f"{'variant':<30} {'first image s':>13} {'s/image':>9} {'samples/s':>10} {'forward img/s':>13} {'pipeline share':>14}"
        )
        medians = {}
        for label, base, method in runs:
            medians[label] = statistics.median(seconds[label])
            pipeline = (args.n0 + args.n) / medians[label]
            forward = forward_throughput(base, method, info.shape, args.batch_size)
            print(
                f"{label:<30} {setup[label]:13.2f} {medians[label]:9.2f} {pipeline:10.0f} {forward:13.0f} {100 * pipeline / forward:13.0f}%"
            )
        a, b, c = (medians[label] for label, _, _ in runs)
        print(f"speedup (c)/(a) = {a / c:.2f}x, (c)/(b) = {b / c:.2f}x, (b)/(a) = {a / b:.2f}x")


if __name__ == "__main__":
    main()
