"""Time certified weight-perturbation bounds for 100 inputs of a 10-layer MLP (width 256).

Weng et al. (AAAI 2020) certify 10-layer MLPs; the target is <= 10 s on 2 cores for the bounds of 100
inputs. Prints, per perturbed layer, the time of one bound (``certify`` at a fixed eps) and of the full
``certified_eps`` search, wall clock and this process's CPU time (on a shared machine the CPU time is
the steadier number), then the totals and the slowest layer. The MLP is freshly initialised (seeded)
with its last bias centring the logits, on Fashion-MNIST test images when installed, else on seeded
random images.

    python bench/weight_bound_speed.py [--threads 2] [--inputs 100] [--layers 0 4 9]
"""

from __future__ import annotations

import argparse
import time

import torch

from qrobust.bounds import ReluNetwork, WeightPerturbation, certified_eps, certify
from qrobust.data import dataset_info, load_dataset
from qrobust.errors import DatasetNotFoundError
from qrobust.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--inputs", type=int, default=100)
    parser.add_argument("--depth", type=int, default=10)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, nargs="*", default=None, help="perturbed layers (default: all)")
    parser.add_argument("--rtol", type=float, default=1e-2, help="relative precision of certified_eps")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    info = dataset_info("fashion-mnist")
    try:
        images = load_dataset("fashion-mnist", "test").subset(args.inputs, seed=0).images
        source = "Fashion-MNIST test images"
    except DatasetNotFoundError:
        images = (torch.rand(args.inputs, *info.shape) * 255).round().to(torch.uint8)
        source = "random images"
    model = build_model("mlp", info, depth=args.depth, width=args.width).eval()
    network = ReluNetwork.from_model(model)
    x = images.to(torch.float64) / 255
    with torch.no_grad():  # centre the logits so that predictions spread over the classes
        features = network.layer_input(x, network.num_layers - 1)
        network = network.replace_layer(
            network.num_layers - 1,
            type(network.layers[-1])(network.layers[-1].weight, -features.mean(0) @ network.layers[-1].weight.t()),
        )
        labels = network(x).argmax(1)
    layers = range(network.num_layers) if args.layers is None else args.layers
    print(
        f"{args.depth}-layer MLP, width {args.width}, {len(images)} {source}, {args.threads} threads, float64, rtol {args.rtol:g}"
    )
    total = total_cpu = slowest = 0.0
    for k in layers:
        (one, one_cpu), _ = timed(certify, network, images, labels, WeightPerturbation((k,), 1e-4))
        (full, full_cpu), eps = timed(certified_eps, network, images, labels, (k,), rtol=args.rtol)
        total, total_cpu, slowest = total + full, total_cpu + full_cpu, max(slowest, full)
        print(
            f"layer {k}: one bound {one:.3f} s (cpu {one_cpu:.3f} s), certified_eps {full:.3f} s (cpu {full_cpu:.3f} s) "
            f"(median eps {float(eps.median()):.3g})"
        )
    print(
        f"total certified_eps time: {total:.2f} s (cpu {total_cpu:.2f} s), slowest layer {slowest:.2f} s (target <= 10 s on 2 cores)"
    )


def timed(function, *args, **kwargs):
    """((wall seconds, this process's CPU seconds), result) of ``function(*args, **kwargs)``."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args, **kwargs)
    return (time.perf_counter() - wall, time.process_time() - cpu), result


if __name__ == "__main__":
    main()
