#!/usr/bin/env bash
# ARQ paper, Fig. 1 analog on Fashion-MNIST: ARQ (DDPG rewarded by the certified radius, via IRS) vs a
# HAQ-style search (rewarded by noisy accuracy) vs fixed precision, at equal BitOPs budgets, for each
# sigma. Each policy's model is fine-tuned the same way and certified on the same test images with
# plain randomized smoothing; bench/arq_summary.py turns the results into tables and plots.
#
# Usage: bench/arq_compare.sh            (env: SIGMAS="0.25 0.5 1.0" BITS="3 4" EPISODES=12 WARMUP=4 JOBS=2
#                                        METHODS="arq haq fixed" VALIDATION=100 MODEL=cnn)
# The paper's ablations are two more METHODS: arq-cert (reward: certified accuracy at r = 0.5, Table 3)
# and arq-rs (each candidate certified by plain RS with as many samples as IRS replays, Table 4).
# Needs the noise-trained fp32 models runs/intrs/cnn-SIGMA.pt (bench/intrs_table2.sh makes them).
# A budget "b bits" is the BitOPs of the uniform b-bit policy (first and last layers at 8 bits).
# Re-running resumes: finished searches, fine-tunings and certifications are kept.
set -euo pipefail
cd "$(dirname "$0")/.."
SIGMAS=${SIGMAS:-"0.25 0.5 1.0"} BITS=${BITS:-"3 4"} EPISODES=${EPISODES:-12} WARMUP=${WARMUP:-4} JOBS=${JOBS:-2}
MODEL=${MODEL:-cnn} RUNS=${RUNS:-runs/arq} OUT=${OUT:-results/arq} IMAGES=${IMAGES:-200} N=${N:-1000}
METHODS=${METHODS:-"arq haq fixed"} VALIDATION=${VALIDATION:-100}  # reward images of each search
export SIGMAS BITS EPISODES WARMUP MODEL RUNS OUT IMAGES N VALIDATION
mkdir -p "$RUNS" "$OUT"

fail() {  # fail LOG: say which job failed and where to look; returns 1
    echo "FAILED $method sigma=$sigma bits=$bits: see $1 ($(tail -n 1 "$1"))" >&2
    return 1
}

job() {  # job METHOD SIGMA BITS
    local method=$1 sigma=$2 bits=$3 B=.venv/bin
    local fp32="runs/intrs/$MODEL-$sigma.pt" dir="$RUNS/$method-$sigma-b$bits"
    local budget
    budget=$($B/python -c "
from qrobust.models.checkpoint import load_checkpoint
from qrobust.quant import BitPolicy, bitops_percent, layer_infos
ckpt = load_checkpoint('$fp32'); model = ckpt.build(); layers = layer_infos(model, ckpt.dataset_info.shape)
print(f'{bitops_percent(layers, BitPolicy.uniform(len(layers), $bits)):.6f}')")
    mkdir -p "$dir"
    case $method in
        fixed) [ -f "$dir/policy.json" ] || $B/python -c "
from qrobust.models.checkpoint import load_checkpoint
from qrobust.quant import BitPolicy, layer_infos
ckpt = load_checkpoint('$fp32'); layers = layer_infos(ckpt.build(), ckpt.dataset_info.shape)
BitPolicy.uniform(len(layers), $bits).save('$dir/policy.json')" ;;
        arq|haq|arq-rs|arq-cert) local options
            case $method in
                arq-rs) options="--reward arq --certifier rs" ;;
                arq-cert) options="--reward certified --reward-radius 0.5" ;;
                *) options="--reward $method" ;;
            esac
            # shellcheck disable=SC2086
            /usr/bin/time -f "%e" -o "$dir/search-seconds.txt" $B/qrobust search "$fp32" --sigma "$sigma" \
            --budget "$budget" $options --episodes "$EPISODES" --warmup "$WARMUP" --finetune-images 2000 \
            --validation-images "$VALIDATION" --n 2000 --n-zeta 500 --seed 0 --output "$dir" > "$dir/search.log" 2>&1 || fail "$dir/search.log" || return ;;
    esac
    [ -f "$dir/model.pt" ] || $B/qrobust finetune "$fp32" --policy "$dir/policy.json" --sigma "$sigma" --epochs 1 \
        --train-subset 20000 --seed 0 --output "$dir/model.pt" > "$dir/finetune.log" 2>&1 || fail "$dir/finetune.log" || return
    [ -f "$dir/certify.tsv" ] || $B/qrobust certify "$dir/model.pt" --sigma "$sigma" --n0 100 --n "$N" --alpha 0.001 \
        --num-examples "$IMAGES" --seed 0 --output "$dir/certify.tsv" > "$dir/certify.log" 2>&1 || fail "$dir/certify.log" || return
    echo "done $method sigma=$sigma bits=$bits budget=$budget%"
}
export -f job fail

for sigma in $SIGMAS; do  # the fp32 reference on the same images
    [ -f "$RUNS/fp32-$sigma.tsv" ] || .venv/bin/qrobust certify "runs/intrs/$MODEL-$sigma.pt" --sigma "$sigma" --n0 100 \
        --n "$N" --alpha 0.001 --num-examples "$IMAGES" --seed 0 --output "$RUNS/fp32-$sigma.tsv" > /dev/null 2>&1
done
for sigma in $SIGMAS; do for bits in $BITS; do for method in $METHODS; do echo "$method $sigma $bits"; done; done; done |
    xargs -P "$JOBS" -L 1 bash -c 'OMP_NUM_THREADS=1 job "$0" "$1" "$2"'
