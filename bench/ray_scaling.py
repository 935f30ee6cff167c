"""Ray backend scaling: the same certification job on 1 and 2 Ray workers (one torch thread each), timed
side by side in one run, with the rows checked equal (issue #7 acceptance: >= 1.7x on 2 cores).

Times include starting the workers and loading the model in each. The committed run (results/scale/):
    .venv/bin/python bench/ray_scaling.py runs/intrs/cnn-0.25.int8.pt --method int --sigma 0.25 \
        --n 100000 --examples 40 --output results/scale/ray-scaling.json
(the int8 model comes from ``bench/intrs_table2.sh 0.25``).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import ray

from qrobust.jobs import SmoothingJob, run_ray
from qrobust.smoothing import evenly_spaced


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="fp32 checkpoint (float-fp) or int8 file (float-quant, int)")
    parser.add_argument("--method", default="int")
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--examples", type=int, default=40)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()

    job = SmoothingJob("certify", args.model, args.method, args.sigma, args.n, 0.001, noise_bank=True)
    _, data, _ = job.open()
    indices = evenly_spaced(len(data), args.examples)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    seconds, rows = {}, {}
    for workers in (1, 2):
        started = time.perf_counter()
        rows[workers] = [row.to_line().split("\t")[:5] for row in run_ray(job, indices, workers, chunk=2)]
        seconds[workers] = time.perf_counter() - started
        print(f"{workers} worker(s): {seconds[workers]:.1f} s for {len(indices)} examples at n = {args.n}")
    ray.shutdown()
    record = {
        "job": asdict(job),
        "examples": len(indices),
        "seconds": seconds,
        "speedup": seconds[1] / seconds[2],
        "rows_equal": rows[1] == rows[2],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"2 workers vs 1: {record['speedup']:.2f}x; identical rows: {record['rows_equal']}  -> {args.output}")


if __name__ == "__main__":
    main()
