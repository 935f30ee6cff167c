"""Samples per input of the confidence-sequence certifier vs the union-bound schedule, on simulated votes.

For each true pA the votes are Bernoulli(pA) draws (no model): the sequential certifier of
``qrobust.smoothing.sequential`` (batches of 256) and ``adaptive.union_bound_radius`` (Clopper-Pearson at
alpha / K over K geometric checkpoints) decide the same table radii with at most n samples. Prints the
mean samples / n of each and the share of inputs certified at each radius. Run:
    .venv/bin/python bench/sequential_simulation.py --sigma 0.25 --radii 0,0.25,0.5,0.75
"""

from __future__ import annotations

import argparse

import numpy as np

from qrobust.smoothing import FloatRS
from qrobust.smoothing.adaptive import SampleSchedule, union_bound_radius
from qrobust.smoothing.methods import GaussianRadius
from qrobust.smoothing.sequential import certify_many


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--radii", default="0,0.25,0.5,0.75")
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--inputs", type=int, default=300, help="simulated inputs per pA (union bound: a third)")
    parser.add_argument("--p-a", default="0.6,0.8,0.9,0.95,0.99,0.995,0.998,0.999,0.9995,0.9999,1.0")
    args = parser.parse_args()
    radii = tuple(float(r) for r in args.radii.split(","))
    radius_map, method = GaussianRadius(args.sigma), FloatRS(args.sigma)
    print(f"sigma {args.sigma}, radii {radii}, alpha {args.alpha}, n {args.n}")
    print("pA        CS samples/n  union-bound samples/n  CS certified share per radius")
    for p in (float(p) for p in args.p_a.split(",")):
        cs, union, shares = _simulate(p, radius_map, method, radii, args)
        print(f"{p:<9} {cs:<13.4f} {union:<22.4f} {np.array2string(shares, precision=3)}")


def _simulate(
    p: float, radius_map: GaussianRadius, method: FloatRS, radii: tuple[float, ...], args: argparse.Namespace
) -> tuple[float, float, np.ndarray]:
    """(CS mean samples / n, union-bound mean samples / n, CS certified share per radius) at true pA ``p``."""
    rng = np.random.default_rng(0)

    def votes(indices: np.ndarray, k: int) -> np.ndarray:
        return rng.binomial(k, p, indices.size)

    results = certify_many(votes, args.inputs, radius_map, radii, args.alpha, args.n)
    schedule = SampleSchedule(args.n)
    union = [
        union_bound_radius(lambda k: int(rng.binomial(k, p)), method.radius, schedule, args.alpha, radii)[2]
        for _ in range(max(1, args.inputs // 3))
    ]
    cs = float(np.mean([r.samples for r in results])) / args.n
    return cs, float(np.mean(union)) / args.n, np.mean([r.certified for r in results], axis=0)


if __name__ == "__main__":
    main()
