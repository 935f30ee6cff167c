"""Images per second of fp32 and int8 inference, side by side in one run, with ratios.

Paths, for ResNet-20 on 3x32x32 and the CNN on 1x28x28 (random weights and BatchNorm statistics,
activation ranges calibrated on random images; speed does not depend on training):

- fp32 eager: the qrobust model as it is, float [0, 1] input.
- fp32 frozen: ``qrobust.models.inference.freeze_for_inference`` (TorchScript trace, freeze,
  optimize_for_inference: BatchNorm folded, oneDNN convolutions), qrobust's fast fp32 path.
- int8 reference: ``qrobust.quant.convert``'s integer-only engine, uint8 input (ground truth, slow).
- int8 fast (oneDNN): ``qrobust.quant.fast_backend`` on the same int8 parameters, uint8 input.

Each path gets its native input (no conversion is timed). Paths are timed in interleaved rounds and
the median is reported, so load from other jobs on the machine biases them alike.

Usage: python bench/int8_backends.py [--batch 256] [--rounds 7] [--threads N]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from qrobust.data.base import DatasetInfo
from qrobust.models import build_model
from qrobust.models.inference import freeze_for_inference
from qrobust.quant import calibrate, convert, fast_backend, prepare_qat

MODELS = {"resnet20": (3, 32, 32), "cnn": (1, 28, 28)}


def make_model(name: str, shape: tuple[int, int, int]) -> nn.Module:
    """A registered model with random weights and non-trivial BatchNorm statistics, in eval mode."""
    channels = shape[0]
    info = DatasetInfo(name, shape, tuple(f"c{i}" for i in range(10)), (0.45,) * channels, (0.25,) * channels)
    torch.manual_seed(0)
    model = build_model(name, info)
    model.train()
    with torch.no_grad():
        model(torch.rand(256, *shape))  # BatchNorm running statistics from data, as after training
    return model.eval()


def paths(name: str, shape: tuple[int, int, int], batch: int) -> dict[str, tuple[Callable, torch.Tensor]]:
    """Each path's callable and its native input batch."""
    model = make_model(name, shape)
    images = torch.randint(0, 256, (batch, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    floats = images.float() / 255
    frozen = freeze_for_inference(make_model(name, shape), floats)
    int8 = convert(calibrate(prepare_qat(model), images))
    found = {
        "fp32 eager": (model, floats),
        "fp32 frozen (TorchScript)": (frozen, floats),
        "int8 reference engine": (int8, images),
    }
    found["int8 fast (oneDNN)"] = (fast_backend(int8), images)
    return found


def measure(found: dict[str, tuple[Callable, torch.Tensor]], rounds: int, batch: int) -> dict[str, float]:
    """Median images/s of each path over interleaved rounds (the slow reference engine: 2 rounds)."""
    times: dict[str, list[float]] = {label: [] for label in found}
    with torch.inference_mode():
        for function, inputs in found.values():
            function(inputs)  # warm-up: lazy initialisation, weight packing, allocator
        for round_index in range(rounds):
            for label, (function, inputs) in found.items():
                if label.startswith("int8 reference") and round_index >= 2:
                    continue
                started = time.perf_counter()
                function(inputs)
                times[label].append(time.perf_counter() - started)
    return {label: batch / statistics.median(seconds) for label, seconds in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}, "
        f"batch {args.batch}, median of {args.rounds} interleaved rounds"
    )
    for name, shape in MODELS.items():
        found = paths(name, shape, args.batch)
        speeds = measure(found, args.rounds, args.batch)
        eager = speeds["fp32 eager"]
        best_fp32 = max(speed for label, speed in speeds.items() if label.startswith("fp32"))
        int8, images = found["int8 reference engine"]
        fast, _ = found["int8 fast (oneDNN)"]
        agreement = float((int8.predict(images) == fast.predict(images)).float().mean())
        size = "x".join(map(str, shape))
        print(f"\n{name} {size}  (fast vs reference top-1 agreement on this batch: {agreement:.4f})")
        print(f"  {'path':28s} {'img/s':>10s} {'vs fp32 eager':>14s} {'vs best fp32':>13s}")
        for label, speed in speeds.items():
            print(f"  {label:28s} {speed:10.0f} {speed / eager:13.2f}x {speed / best_fp32:12.2f}x")


if __name__ == "__main__":
    main()
