"""The default int8 backend (oneDNN ops on plain tensors) against the retired torch.ao one: speed and agreement.

Both backends run the same ``Int8Model`` (random weights, BatchNorm statistics measured on images,
logits centred so predictions spread over the classes, activation ranges calibrated on random
lattice images) of the CNN on 1x28x28 and ResNet-20 on 3x32x32. Speed: images/s (median) at one
batch size, the backends timed in interleaved rounds, which goes first alternating, so load from
other jobs biases them alike; "vs old" is the median over rounds of the time ratio within a round.
Agreement with the integer reference engine: top-1 and exact int32 logit vectors on noisy inputs
(smooth random images plus Gaussian noise, on the uint8 lattice).

The retired backend (torch eager quantized tensors, deprecated by torch 2.13) lives on below only to
be measured against; qrobust itself no longer uses it.

Usage: PYTHONPATH=src python bench/int8_backend.py [--batch 256] [--rounds 11] [--threads 1] [--inputs 1000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
from torch import nn

from qrobust.data.base import DatasetInfo
from qrobust.models import build_model
from qrobust.quant import Int8Model, calibrate, convert, fast_backend, prepare_qat
from qrobust.quant.engine import IntAdd, IntConv2d, IntFlatten, IntLinear, IntMaxPool2d, run_program
from qrobust.quant.numerics import lattice_codes, pad_channels

MODELS = {"cnn": (1, 28, 28), "resnet20": (3, 32, 32)}


class _Retired(nn.Module):
    """The retired backend, trimmed: torch.ao quantized modules on quint8 tensors (x86 engine)."""

    def __init__(self, model: Int8Model):
        super().__init__()
        self.inputs, self.grid, steps = model.inputs, (model.input_step, model.input_zero_point), []
        qparams = model.value_qparams
        for index, (op, args) in enumerate(zip(model.ops, model.inputs)):
            out = qparams[index + 1]
            if isinstance(op, IntConv2d | IntLinear) and not (isinstance(op, IntLinear) and op.logits):
                zero_pad = bool(torch.all(op.pad_value == op.in_zero_point)) if isinstance(op, IntConv2d) else True
                if isinstance(op, IntConv2d):
                    kind = nniq.ConvReLU2d if op.relu else nnq.Conv2d
                    shape = (op.weight.shape[1], op.weight.shape[0], tuple(op.weight.shape[2:]))
                    module = kind(*shape, stride=op.stride, padding=op.padding if zero_pad else (0, 0))
                else:
                    module = (nniq.LinearReLU if op.relu else nnq.Linear)(op.weight.shape[1], op.weight.shape[0])
                weight = torch._make_per_channel_quantized_tensor(
                    op.weight, op.weight_scale, torch.zeros_like(op.weight_scale, dtype=torch.int64), 0
                )
                module.set_weight_bias(weight, (op.bias.double() * (qparams[args[0]][0] * op.weight_scale)).float())
                module.scale, module.zero_point = out
                pad = None if zero_pad or not any(op.padding) else (op.padding, op.pad_value)
                steps.append((module, [qparams[args[0]]], pad))
            elif isinstance(op, IntAdd):
                functional = nnq.QFunctional()
                functional.scale, functional.zero_point = out
                steps.append((functional.add_relu if op.relu else functional.add, [qparams[i] for i in args], None))
            elif isinstance(op, IntMaxPool2d):
                pool = nn.MaxPool2d(op.kernel_size, op.stride, op.padding)
                steps.append((pool, [qparams[args[0]]], None))
            elif isinstance(op, IntFlatten):
                steps.append((nn.Flatten(), [], None))
            else:
                steps.append((op, [], None))  # average pooling and logits: reference integer ops
        self.steps = steps

    def _step(self, index: int):
        function, in_qparams, pad = self.steps[index]

        def run(*xs: torch.Tensor) -> torch.Tensor:
            if not in_qparams:  # an integer op: plain integers in
                return function(
                    *(x.int_repr() if x.is_quantized and not isinstance(function, nn.Flatten) else x for x in xs)
                )
            quantized = []
            for x, qparams in zip(xs, in_qparams):
                if pad is not None:
                    x = pad_channels(x.int_repr() if x.is_quantized else x, *pad)
                if not x.is_quantized:
                    x = torch._make_per_tensor_quantized_tensor(x.contiguous(), *qparams)
                quantized.append(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x)
            return function(*quantized)

        return run

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        previous, torch.backends.quantized.engine = torch.backends.quantized.engine, "x86"
        try:
            runs = [self._step(i) for i in range(len(self.steps))]
            return run_program(runs, self.inputs, lattice_codes(images, *self.grid))
        finally:
            torch.backends.quantized.engine = previous


def lattice_images(n: int, shape: tuple[int, int, int], seed: int, sigma: float) -> torch.Tensor:
    """Smooth random images plus Gaussian noise of std ``sigma`` (in [0, 1] units), on the uint8 lattice."""
    generator = torch.Generator().manual_seed(seed)
    smooth = nn.functional.interpolate(
        torch.rand(n, shape[0], 4, 4, generator=generator), size=shape[1:], mode="bilinear"
    )
    return (
        ((smooth + sigma * torch.randn(smooth.shape, generator=generator)) * 255).round().clamp(0, 255).to(torch.uint8)
    )


def make_int8(name: str, shape: tuple[int, int, int]) -> Int8Model:
    """A registered model with data-measured BatchNorm statistics and centred logits, calibrated and converted."""
    channels = shape[0]
    info = DatasetInfo(name, shape, tuple(f"c{i}" for i in range(10)), (0.45,) * channels, (0.25,) * channels)
    torch.manual_seed(0)
    model = build_model(name, info)
    images = lattice_images(256, shape, seed=1, sigma=0.25).float() / 255
    model.train()
    with torch.no_grad():
        model(images)  # BatchNorm running statistics from data, as after training
        model.eval()
        last = [module for module in model.modules() if isinstance(module, nn.Linear)][-1]
        features = []
        handle = last.register_forward_hook(lambda module, args, output: features.append(args[0]))
        model(images)
        handle.remove()
        last.bias.copy_(-features[0].mean(0) @ last.weight.t())  # predictions spread over the classes
    return convert(calibrate(prepare_qat(model), lattice_images(256, shape, seed=2, sigma=0.25)))


def measure(name: str, shape: tuple[int, int, int], args: argparse.Namespace) -> dict[str, float]:
    int8 = make_int8(name, shape)
    new, old = fast_backend(int8), _Retired(int8)
    noisy = lattice_images(args.inputs, shape, seed=3, sigma=args.sigma)
    reference = torch.cat([int8(chunk) for chunk in noisy.split(256)])
    result: dict[str, float] = {}
    for label, backend in (("new", new), ("old", old)):
        logits = torch.cat([backend(chunk) for chunk in noisy.split(256)])
        result[f"{label} top-1 agreement"] = float((logits.argmax(1) == reference.argmax(1)).double().mean())
        result[f"{label} exact-logit agreement"] = float((logits == reference).all(1).double().mean())
    batch = noisy[: args.batch] if args.inputs >= args.batch else lattice_images(args.batch, shape, 4, args.sigma)
    times: dict[str, list[float]] = {"new": [], "old": []}
    for backend in (new, old):
        backend(batch)  # warm-up: weight packing, allocator
    for round_index in range(args.rounds):
        order = (("new", new), ("old", old)) if round_index % 2 == 0 else (("old", old), ("new", new))
        for label, backend in order:  # alternating which goes first, so neither always runs on a warm cache
            started = time.perf_counter()
            backend(batch)
            times[label].append(time.perf_counter() - started)
    for label, seconds in times.items():
        result[f"{label} img/s"] = args.batch / statistics.median(seconds)
    # the median of per-round ratios: both backends of a round ran under the same load
    result["speed ratio new/old"] = statistics.median(o / n for n, o in zip(times["new"], times["old"]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--inputs", type=int, default=1000, help="noisy inputs for the agreement figures")
    parser.add_argument("--sigma", type=float, default=0.25, help="noise std of those inputs, in [0, 1] units")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    flags = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")][:1]
    int8_flags = sorted({flag for flag in flags[0].split() if "vnni" in flag or "amx" in flag} if flags else set())
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}, median of {args.rounds} interleaved "
        f"rounds, load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs, int8 CPU flags {' '.join(int8_flags)}"
    )
    print(f"agreement with the integer reference engine on {args.inputs} noisy inputs (sigma {args.sigma})\n")
    print(f"{'model':10s} {'backend':34s} {'img/s':>8s} {'vs old':>7s} {'top-1':>8s} {'exact logits':>13s}")
    for name, shape in MODELS.items():
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "torch.quantize_per_tensor", UserWarning)  # the retired backend's
            result = measure(name, shape, args)
        for label, title in (("new", "oneDNN ops, plain tensors (default)"), ("old", "torch.ao quantized tensors")):
            ratio = result["speed ratio new/old"] if label == "new" else 1.0
            print(
                f"{name:10s} {title:34s} {result[f'{label} img/s']:8.0f} {ratio:6.2f}x "
                f"{result[f'{label} top-1 agreement']:8.4f} {result[f'{label} exact-logit agreement']:13.4f}"
            )
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
