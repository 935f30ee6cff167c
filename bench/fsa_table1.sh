#!/usr/bin/env bash
# Table 1 analog only (fault sneaking attack vs certified bound, last 4 layers of the 10-layer MLP),
# with the committed results/admm/config.json sizes; one thread, log under /tmp. Extra arguments are
# passed on, e.g. `bench/fsa_table1.sh --fsa-layers 7,8 --output /tmp/fsa78` (the last --output wins).
set -euo pipefail
cd "$(dirname "$0")/.."
OMP_NUM_THREADS=1 .venv/bin/python bench/admm_quantization.py --output results/admm --only table1 \
    --fsa-depth 10 --width 256 --epochs 5 --lr 0.05 --test-subset 2000 --certify-images 100 \
    --fsa-targets 4 --fsa-keep 500 --fsa-keep-fraction 0.95 --fsa-steps 1000 --seed 0 "$@" 2>&1 | tee /tmp/fsa_table1.log
