#!/usr/bin/env bash
# Binary-Relax / EnResNet / trade-off loss paper, Tables 1-5 analog: train every configuration below with
# `qrobust train`, attack it with the paper's A1-A3 (`qrobust attack`), then write the tables with
# bench/robust_summary.py.
#
# Usage: bench/robust_tables.sh [GROUPS]   (default: "acceptance binary tradeoff sparsity")
# The defaults are the committed Fashion-MNIST run (results/robust/), shortened for 2 CPU cores:
# the ResNet-20-style networks have one block per stage (ResNet-8, En_n ResNet-8), they train on
# TRAIN images (default 5,000) for EPOCHS epochs (default 5) with PGD-5 adversaries (eps 0.031,
# step 0.01) instead of PGD-10, and are attacked on EXAMPLES test images (default 300); Table 4 has
# only the binary PGD and trade-off (beta 8) rows, Table 5 no plain-ResNet rows. BETAS (default
# "1 4 8") are the TRADES / trade-off betas of Table 3.
# The paper's CIFAR-10 setting, for users who have the binary CIFAR-10 files under ./data:
#   DATASET=cifar10 DATA_ROOT=data DEPTH=20 TRAIN=50000 EPOCHS=200 LR_STEP=80 STEPS=10 STEP=0.007 \
#       EXAMPLES=10000 bench/robust_tables.sh "binary tradeoff sparsity"
# (CIFAR-100, SVHN and MNIST: the same with DATASET=cifar100, svhn or mnist.)
# Runs go to RUNS (default runs/robust), two at a time with one thread each; re-running resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
GROUPS_TO_RUN=${1:-"acceptance binary tradeoff sparsity"}
DATASET=${DATASET:-fashion-mnist} DATA_ROOT=${DATA_ROOT:-} DEPTH=${DEPTH:-8}
TRAIN=${TRAIN:-5000} EPOCHS=${EPOCHS:-5} LR=${LR:-0.05} LR_STEP=${LR_STEP:-4}
STEPS=${STEPS:-5} STEP=${STEP:-0.01} EXAMPLES=${EXAMPLES:-300} JOBS=${JOBS:-2} BETAS=${BETAS:-"1 4 8"}
RUNS=${RUNS:-runs/robust} OUT=${OUT:-results/robust}
export RUNS OUT DATASET EXAMPLES
mkdir -p "$RUNS" "$OUT"
ROOT=""; [ -n "$DATA_ROOT" ] && ROOT="--data-root $DATA_ROOT"
COMMON="--dataset $DATASET $ROOT --train-subset $TRAIN --test-subset 1000 --epochs $EPOCHS --lr $LR --lr-step $LR_STEP --batch-size 128 --seed 0"
AT="--eps 0.031 --step-size $STEP --attack-steps $STEPS"
R="--model resnet$DEPTH" E1="--model enresnet$DEPTH --model-option members=1" E2="--model enresnet$DEPTH --model-option members=2"
BR="--quant br --rho 2 --cutoff-epoch $((EPOCHS * 2 / 3))" BC="--quant bc"

# name | training arguments (each run: one line)
runs() {
    case $1 in
    acceptance) cat <<EOF
cnn-natural|--model cnn --dataset $DATASET $ROOT --epochs 3 --lr 0.05 --lr-step 2 --batch-size 128 --seed 0 --test-subset 1000
cnn-pgd|--model cnn --dataset $DATASET $ROOT --train-subset 20000 --epochs 4 --lr 0.05 --lr-step 3 --batch-size 128 --seed 0 --test-subset 1000 --loss pgd --eps 0.1 --step-size 0.025 --attack-steps 7
EOF
    ;;
    binary) cat <<EOF
resnet-float-at|$R $COMMON --loss pgd $AT
resnet-bc-at|$R $COMMON --loss pgd $AT $BC --bits 1
resnet-br-at|$R $COMMON --loss pgd $AT $BR --bits 1
en1-float-at|$E1 $COMMON --loss pgd $AT
en1-bc-at|$E1 $COMMON --loss pgd $AT $BC --bits 1
en1-br-at|$E1 $COMMON --loss pgd $AT $BR --bits 1
en2-float-at|$E2 $COMMON --loss pgd $AT
en2-br-at|$E2 $COMMON --loss pgd $AT $BR --bits 1
EOF
    ;;
    tradeoff) for beta in $BETAS; do cat <<EOF
en1-float-trades$beta|$E1 $COMMON --loss trades --beta $beta $AT
en1-float-tradeoff$beta|$E1 $COMMON --loss tradeoff --alpha 1 --beta $beta $AT
EOF
    done
    echo "en1-br-tradeoff8|$E1 $COMMON --loss tradeoff --alpha 1 --beta 8 $AT $BR --bits 1" ;;
    sparsity) for bits in 2 4; do cat <<EOF
en1-br$bits-natural|$E1 $COMMON $BR --bits $bits
en1-br$bits-at|$E1 $COMMON --loss pgd $AT $BR --bits $bits
en1-br$bits-tradeoff8|$E1 $COMMON --loss tradeoff --alpha 1 --beta 8 $AT $BR --bits $bits
EOF
    done ;;
    *) echo "unknown group $1 (acceptance, binary, tradeoff, sparsity)" >&2; exit 2 ;;
    esac
}

# Train (resuming) and attack one run; the attack is redone only when the checkpoint is newer.
one() {
    name=${1%%|*} args=${1#*|}
    attacks="--attack fgsm --attack ifgsm --attack cw --cw-lr 0.0006 --cw-steps 50 --cw-search-steps 1"
    case $name in cnn-*) attacks="--attack fgsm --attack pgd --eps 0.1 --step-size 0.01 --steps 20" ;; esac
    # shellcheck disable=SC2086
    OMP_NUM_THREADS=1 .venv/bin/qrobust train $args --resume --output "$RUNS/$name.pt" > "$RUNS/$name.log" 2>&1 \
        || { echo "FAILED: train $name (see $RUNS/$name.log)"; return 1; }
    [ "$OUT/attack-$name.json" -nt "$RUNS/$name.pt" ] && return 0
    # shellcheck disable=SC2086
    OMP_NUM_THREADS=1 .venv/bin/qrobust attack "$RUNS/$name.pt" $attacks --num-examples "$EXAMPLES" $ROOT \
        --overwrite --output "$OUT/attack-$name.json" >> "$RUNS/$name.log" 2>&1 \
        || { echo "FAILED: attack $name (see $RUNS/$name.log)"; return 1; }
    echo "done: $name"
}
export -f one
export ROOT

for group in $GROUPS_TO_RUN; do runs "$group"; done | xargs -d '\n' -P "$JOBS" -I{} bash -c 'one "$@"' _ {}
.venv/bin/python bench/robust_summary.py "$RUNS" "$OUT"
