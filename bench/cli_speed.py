"""Time the command line's quick paths: ``qrobust --help``, every ``COMMAND --help`` and argument errors.

Target (issue #18): each prints in <= 0.5 s wall on an idle 2-core machine, median of 10 runs, because
the ``qrobust.cli`` package imports only typer, rich and qrobust's light modules until a command runs.
Each command is one fresh ``python -m qrobust`` process, started ``--runs`` times after one warm-up run
that is not counted; wall time is read around the process, CPU time (user + system) from the OS's
accounting of the finished child. Prints min / median / max per command and exits 1 if a median misses
the target.

    python bench/cli_speed.py [--runs 10] [--target 0.5] > results/cli-speed/cli-speed.txt
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

COMMANDS = (
    "train",
    "quantize",
    "export",
    "attack",
    "certify",
    "predict",
    "analyze",
    "report",
    "search",
    "finetune",
    "weight-bound",
    "verify-quantization",
)
ERRORS = (
    ("certify", "x", "--sigma", "-1", "--output", "y"),
    ("predict", "x", "--sigma", "0.5", "--alpha", "2", "--output", "y"),
    ("train", "--epochs", "0", "--output", "y.pt"),
    ("attack", "x", "--attack", "nope"),
    ("certify", "x", "--sigma", "0.5"),  # a missing option: typer's usage error
)


def time_command(args: tuple[str, ...], runs: int) -> tuple[list[float], list[float], int]:
    """Wall and CPU seconds of ``runs`` runs of ``python -m qrobust ARGS`` (after one warm-up) and its exit code."""
    walls, cpus, code = [], [], 0
    for run in range(runs + 1):
        start = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", "qrobust", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        code = process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen is told
        if run:  # the first run warms the file cache and is not counted
            walls.append(wall)
            cpus.append(usage.ru_utime + usage.ru_stime)
    return walls, cpus, code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--target", type=float, default=0.5, help="seconds of median wall time")
    args = parser.parse_args()
    print(
        f"python -m qrobust, {args.runs} runs each after 1 warm-up; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}"
    )
    print(f"{'command':<58} {'exit':>4} {'wall min':>9} {'median':>7} {'max':>6} {'cpu median':>10}")
    missed = []
    for command in [("--help",), *((name, "--help") for name in COMMANDS), *ERRORS]:
        walls, cpus, code = time_command(command, args.runs)
        median = statistics.median(walls)
        print(
            f"{' '.join(command):<58} {code:>4} {min(walls):>9.3f} {median:>7.3f} {max(walls):>6.3f} {statistics.median(cpus):>10.3f}"
        )
        if median > args.target:
            missed.append(" ".join(command))
    print(f"every median <= {args.target} s" if not missed else f"above {args.target} s: {', '.join(missed)}")
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
