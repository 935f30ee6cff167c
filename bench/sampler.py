"""Throughput of the discrete Gaussian samplers, measured side by side, and the fast table's accuracy.

Run from the repository root: ``.venv/bin/python bench/sampler.py``. Rounds interleave the samplers,
so load from other processes hits all of them alike; the median of the rounds is the headline figure.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from qrobust.noise import GaussianNoise, exact_discrete_gaussian, inverse_cdf_table, sample_discrete_gaussian

TABLE_SIGMAS = (0.5, 2.0, 31.875, 63.75, 255.0)


def table_report(sigmas: tuple[float, ...]) -> None:
    """Support, guide-table miss rate and distance to the exact distribution of each table."""
    print(
        f"{'sigma_int':>9} {'K':>5} {'ambiguous':>9} {'tail mass':>10} {'TV to exact':>11} {'log2 TV':>7} {'build s':>7}"
    )
    for sigma_int in sigmas:
        start = time.perf_counter()
        table = inverse_cdf_table(sigma_int)
        build = time.perf_counter() - start
        print(
            f"{sigma_int:9g} {table.offset:5d} {table.ambiguous_fraction:9.2e} {table.tail_mass:10.2e} "
            f"{table.tv_distance:11.3e} {math.log2(table.tv_distance):7.2f} {build:7.3f}"
        )


def samplers(sigma_int: float, n: int, exact_n: int) -> dict[str, tuple[int, Callable[[], object]]]:
    """Name -> (draws per call, call). Each call draws fresh samples from its own seeded generator."""
    torch_generator = torch.Generator().manual_seed(0)
    numpy_generator = np.random.default_rng(0)
    python_random = random.Random(0)
    table = inverse_cdf_table(sigma_int)
    signed = torch.from_numpy((table.thresholds ^ np.uint64(2**63)).view(np.int64))
    zeros = torch.zeros(n)

    def plain_search() -> torch.Tensor:
        words = torch.empty(n, dtype=torch.int64).random_(-(2**63), None, generator=torch_generator)
        return torch.searchsorted(signed, words ^ -(2**63), right=True) - table.offset

    return {
        "table + guide, torch.Generator": (n, lambda: sample_discrete_gaussian(sigma_int, n, torch_generator)),
        "table + guide, numpy Generator": (n, lambda: sample_discrete_gaussian(sigma_int, n, numpy_generator)),
        "plain torch.searchsorted (no guide)": (n, plain_search),
        "exact CKS 2020 (pure Python)": (exact_n, lambda: exact_discrete_gaussian(sigma_int, exact_n, python_random)),
        "continuous GaussianNoise (float32)": (n, lambda: GaussianNoise(sigma_int).sample(zeros, torch_generator)),
    }


def throughput(sigma_int: float, n: int, exact_n: int, rounds: int) -> None:
    """Samples per second of every sampler: median (min-max) over interleaved rounds."""
    calls = samplers(sigma_int, n, exact_n)
    for _, call in calls.values():  # warm-up: builds and caches the table, faults in memory
        call()
    rates: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, (draws, call) in calls.items():
            start = time.perf_counter()
            call()
            rates[name].append(draws / (time.perf_counter() - start))
    print(f"\nsigma_int = {sigma_int:g}: {n:.0e} draws per call ({exact_n} for CKS), {rounds} rounds")
    for name, values in rates.items():
        print(
            f"  {name:37s} {statistics.median(values) / 1e6:9.3f} M/s"
            f"   ({min(values) / 1e6:.3f}-{max(values) / 1e6:.3f})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sigma-int", type=float, nargs="+", default=[63.75], help="lattice sigmas to time")
    parser.add_argument("--n", type=int, default=10**7, help="draws per call of the fast samplers")
    parser.add_argument("--exact-n", type=int, default=2000, help="draws per call of the exact sampler")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    print(
        f"torch {torch.__version__}, numpy {np.__version__}, {torch.get_num_threads()} torch threads, "
        f"{os.cpu_count()} cpus, {platform.processor() or platform.machine()}, load {os.getloadavg()[0]:.2f}"
    )
    table_report(TABLE_SIGMAS)
    for sigma_int in args.sigma_int:
        throughput(sigma_int, args.n, args.exact_n, args.rounds)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
