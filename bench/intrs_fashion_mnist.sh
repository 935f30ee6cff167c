#!/usr/bin/env bash
# IntRS paper, Table 2 / Figs. 3 and 5 analog on Fashion-MNIST with the small CNN: for each sigma, train
# an fp32 model with Gaussian noise (FloatRS-fp), fine-tune it quantization-aware with discrete noise
# and convert it to int8 (IntRS-quant and FloatRS-quant), certify the same test images with all three
# methods, and write the tables and plots to results/intrs/.
#
# Usage: bench/intrs_fashion_mnist.sh [SIGMAS] [N] [IMAGES]   (defaults: "0.12 0.25 0.5 1.0" 10000 500)
# Re-running resumes: finished trainings and certifications are kept.
set -euo pipefail
cd "$(dirname "$0")/.."
SIGMAS=${1:-"0.12 0.25 0.5 1.0"}
N=${2:-10000}
IMAGES=${3:-500}
RUNS=runs/intrs
OUT=results/intrs
BIN=.venv/bin
mkdir -p "$RUNS" "$OUT"

for sigma in $SIGMAS; do
    fp32="$RUNS/cnn-$sigma.pt" qat="$RUNS/cnn-$sigma-qat.pt" int8="$RUNS/cnn-$sigma.int8.pt"
    $BIN/qrobust train --dataset fashion-mnist --model cnn --sigma "$sigma" --epochs 5 --lr 0.05 --lr-step 3 \
        --batch-size 128 --seed 0 --resume --output "$fp32"
    $BIN/qrobust train --init "$fp32" --qat --noise discrete --sigma "$sigma" --epochs 2 --lr 0.005 \
        --batch-size 128 --seed 0 --resume --output "$qat"
    [ -f "$int8" ] || $BIN/qrobust quantize "$qat" --output "$int8"
    for method in float-fp float-quant int; do
        model=$int8; [ "$method" = float-fp ] && model=$fp32
        tsv="$OUT/certify-$method-$sigma.tsv"
        [ -f "$tsv" ] && [ "$(($(wc -l < "$tsv") - 1))" -eq "$IMAGES" ] && continue
        $BIN/qrobust certify "$model" --method "$method" --sigma "$sigma" --n0 100 --n "$N" --alpha 0.001 \
            --num-examples "$IMAGES" --noise-bank --seed 0 --overwrite --output "$tsv"
    done
    $BIN/qrobust analyze "$OUT"/certify-{float-fp,int,float-quant}-"$sigma".tsv \
        --label FloatRS-fp --label IntRS-quant --label FloatRS-quant --radii 0,0.25,0.5,0.75,1,1.25,1.5 \
        --plot "$OUT/certified-accuracy-$sigma.png" | tee "$OUT/table-$sigma.txt"
done
