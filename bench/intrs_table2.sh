#!/usr/bin/env bash
# IntRS paper, Table 2 / Figs. 3 and 5 analog: for each sigma, train an fp32 model with Gaussian noise
# (FloatRS-fp), fine-tune it quantization-aware with discrete noise and convert it to int8 (IntRS-quant
# and FloatRS-quant), certify the same test images with all three methods, and write tables and plots.
#
# Usage: bench/intrs_table2.sh [SIGMAS] [N] [IMAGES]   (defaults: "0.12 0.25 0.5 1.0" 10000 500)
# The defaults are the committed Fashion-MNIST run (results/intrs/). CIFAR-10 with ResNet-20, as in the
# paper, for users who have the binary CIFAR-10 files under ./data:
#   DATASET=cifar10 MODEL=resnet20 EPOCHS=90 LR=0.1 LR_STEP=30 QAT_EPOCHS=5 DATA_ROOT=data \
#       bench/intrs_table2.sh "0.12 0.25 0.5 1.0" 100000 500
# Re-running resumes: finished trainings and certifications are kept.
# INPUT_MARGIN=M makes the int8 model read unclipped noisy lattice inputs in [-M, 255 + M] (docs/intrs-radius.md, section 5);
# QAT_LR_STEP drops the QAT learning rate every so many epochs. The committed main tables used INPUT_MARGIN=0.
set -euo pipefail
cd "$(dirname "$0")/.."
SIGMAS=${1:-"0.12 0.25 0.5 1.0"}
N=${2:-10000}
IMAGES=${3:-500}
DATASET=${DATASET:-fashion-mnist} MODEL=${MODEL:-cnn} EPOCHS=${EPOCHS:-5} LR=${LR:-0.05} LR_STEP=${LR_STEP:-3}
QAT_EPOCHS=${QAT_EPOCHS:-2} QAT_LR_STEP=${QAT_LR_STEP:-30} INPUT_MARGIN=${INPUT_MARGIN:-0} DATA_ROOT=${DATA_ROOT:-}
RUNS=${RUNS:-runs/intrs} OUT=${OUT:-results/intrs}
BIN=.venv/bin
ROOT=(); [ -n "$DATA_ROOT" ] && ROOT=(--data-root "$DATA_ROOT")
mkdir -p "$RUNS" "$OUT"

for sigma in $SIGMAS; do
    fp32="$RUNS/$MODEL-$sigma.pt" qat="$RUNS/$MODEL-$sigma-qat.pt" int8="$RUNS/$MODEL-$sigma.int8.pt"
    $BIN/qrobust train --dataset "$DATASET" "${ROOT[@]}" --model "$MODEL" --sigma "$sigma" --epochs "$EPOCHS" \
        --lr "$LR" --lr-step "$LR_STEP" --batch-size 128 --seed 0 --resume --output "$fp32"
    $BIN/qrobust train --init "$fp32" "${ROOT[@]}" --qat --input-margin "$INPUT_MARGIN" --noise discrete --sigma "$sigma" \
        --epochs "$QAT_EPOCHS" --lr 0.005 --lr-step "$QAT_LR_STEP" --batch-size 128 --seed 0 --resume --output "$qat"
    [ "$int8" -nt "$qat" ] || $BIN/qrobust quantize "$qat" "${ROOT[@]}" --overwrite --output "$int8"
    for method in float-fp float-quant int; do
        model=$int8; [ "$method" = float-fp ] && model=$fp32
        tsv="$OUT/certify-$method-$sigma.tsv"
        [ "$tsv" -nt "$model" ] && [ "$(($(wc -l < "$tsv") - 1))" -eq "$IMAGES" ] && continue
        $BIN/qrobust certify "$model" "${ROOT[@]}" --method "$method" --sigma "$sigma" --n0 100 --n "$N" \
            --alpha 0.001 --num-examples "$IMAGES" --noise-bank --seed 0 --overwrite --output "$tsv"
    done
    $BIN/qrobust analyze "$OUT"/certify-{float-fp,int,float-quant}-"$sigma".tsv \
        --label FloatRS-fp --label IntRS-quant --label FloatRS-quant --radii 0,0.25,0.5,0.75,1,1.25,1.5 \
        --plot "$OUT/certified-accuracy-$sigma.png" | tee "$OUT/table-$sigma.txt"
done
