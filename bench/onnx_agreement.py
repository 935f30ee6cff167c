"""onnxruntime vs qrobust's int8 backends on one int8 model: top-1 agreement and throughput, side by side.

The int8 file is exported in memory (``qrobust.quant.export.to_onnx``, QOperator, uint8 activations) and
run by onnxruntime; N test images of the model's dataset get one IntRS noise draw each (int16 x + n,
unclipped, the inputs certification feeds) and are classified by the integer reference engine (ground
truth), torch's fast int8 backend and onnxruntime. Throughput is images/s on one batch of such inputs,
median over interleaved rounds, each path taking them as ``SmoothedClassifier`` passes them (int16
lattice values; onnxruntime's wrapper converts them to float32 inside the timed call).

Run for the issue "Export fp32 and int8 models to ONNX":
    OMP_NUM_THREADS=1 .venv/bin/python bench/onnx_agreement.py runs/intrs/cnn-0.25.int8.pt --images 2000
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import onnxruntime
import torch

from qrobust.data import DatasetInfo, load_dataset
from qrobust.quant import fast_backend, load_int8
from qrobust.quant.export import OnnxRuntimeModel, to_onnx
from qrobust.smoothing import IntRS, evenly_spaced


def predictions(model, inputs: torch.Tensor, batch: int) -> torch.Tensor:
    """Top-1 labels (N,) of ``inputs`` (N, C, H, W), in batches."""
    return torch.cat([model(inputs[start : start + batch]).argmax(1) for start in range(0, len(inputs), batch)])


def throughput(models: dict[str, object], inputs: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median images/s of each model on ``inputs`` over interleaved rounds, after one warm-up call each."""
    seconds: dict[str, list[float]] = {label: [] for label in models}
    with torch.inference_mode():
        for model in models.values():
            model(inputs)
        for _ in range(rounds):
            for label, model in models.items():
                started = time.perf_counter()
                model(inputs)
                seconds[label].append(time.perf_counter() - started)
    return {label: len(inputs) / statistics.median(times) for label, times in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("int8", type=Path, help="int8 model file (qrobust quantize)")
    parser.add_argument("--images", type=int, default=2000, help="test images, one noise draw each")
    parser.add_argument(
        "--sigma",
        type=float,
        default=None,
        help="IntRS noise std in [0, 1] units (default: the model's training sigma, else 0.25)",
    )
    parser.add_argument("--batch", type=int, default=256, help="images per forward pass")
    parser.add_argument("--rounds", type=int, default=7, help="timing rounds")
    parser.add_argument(
        "--threads", type=int, default=None, help="onnxruntime intra-op threads (default: torch.get_num_threads())"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    saved = load_int8(args.int8)
    info = DatasetInfo.from_dict(saved.metadata["dataset"])
    sigma = args.sigma if args.sigma is not None else saved.metadata.get("sigma") or 0.25
    data = load_dataset(info.name, "test")
    data = data.select(evenly_spaced(len(data), args.images))
    noisy = IntRS(sigma).perturb(data.images, torch.Generator().manual_seed(args.seed))  # (N, C, H, W) int16
    proto = to_onnx(saved.model, info.shape)
    models = {
        "int8 reference engine": saved.model,
        "torch fast int8 (x86)": fast_backend(saved.model),
        "onnxruntime int8": OnnxRuntimeModel(proto, args.threads),
    }
    with torch.inference_mode():
        labels = {name: predictions(model, noisy, args.batch) for name, model in models.items()}
    reference = labels["int8 reference engine"]

    print(f"{args.int8} ({info.name}, {len(noisy)} test images, one IntRS draw each at sigma {sigma})")
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {onnxruntime.__version__} "
        f"({models['onnxruntime int8'].threads} threads), {platform.machine()}"
    )
    print(f"sizes: int8 file {args.int8.stat().st_size / 1024:.1f} KiB, ONNX {proto.ByteSize() / 1024:.1f} KiB")
    timed = {name: model for name, model in models.items() if "reference" not in name}  # the engine is slow
    speed = throughput(timed, noisy[: args.batch], args.rounds)
    print(f"{'backend':<24}{'agree w/ engine':>17}{'accuracy':>10}{'img/s':>10}")
    for name, predicted in labels.items():
        agreement = float((predicted == reference).float().mean())
        accuracy = float((predicted == data.labels).float().mean())
        rate = f"{speed[name]:.0f}" if name in speed else "-"
        print(f"{name:<24}{100 * agreement:>16.2f}%{100 * accuracy:>9.2f}%{rate:>10}")
    disagree = int((labels["onnxruntime int8"] != reference).sum())
    print(
        f"onnxruntime vs engine: {disagree} of {len(noisy)} predictions differ; "
        f"onnxruntime / torch fast throughput: {speed['onnxruntime int8'] / speed['torch fast int8 (x86)']:.2f}x"
    )


if __name__ == "__main__":
    main()
