#!/usr/bin/env bash
# IntRS paper, Tables 4-5 (train sigma fixed, certify sigma varied) and supplement Table 1 / Fig. 11
# (prediction: correct and abstain rates against n and alpha), on the Fashion-MNIST models that
# bench/intrs_fashion_mnist.sh trained (run it first). Outputs go to results/intrs/.
#
# Usage: bench/intrs_extras.sh [N] [IMAGES]   (defaults: 10000 200)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-10000}
IMAGES=${2:-200}
RUNS=runs/intrs
OUT=results/intrs
BIN=.venv/bin
mkdir -p "$OUT/mismatch" "$OUT/predict"

# Tables 4-5: models trained at 0.12 and 0.25, certified at every sigma
for train in 0.12 0.25; do
    for certify in 0.12 0.25 0.5 1.0; do
        for method in float-fp int; do
            model=$RUNS/cnn-$train.int8.pt; [ "$method" = float-fp ] && model=$RUNS/cnn-$train.pt
            tsv=$OUT/mismatch/train-$train-certify-$certify-$method.tsv
            [ -f "$tsv" ] && [ "$(($(wc -l < "$tsv") - 1))" -eq "$IMAGES" ] && continue
            $BIN/qrobust certify "$model" --method $method --sigma $certify --n0 100 --n "$N" --alpha 0.001 \
                --num-examples "$IMAGES" --noise-bank --seed 0 --overwrite --output "$tsv"
        done
    done
    $BIN/qrobust analyze $OUT/mismatch/train-$train-certify-*-int.tsv $OUT/mismatch/train-$train-certify-*-float-fp.tsv \
        --radii 0,0.25,0.5,0.75,1 | tee "$OUT/mismatch/table-train-$train.txt"
done

# Supplement Table 1 (n) and Fig. 11 (alpha): IntRS-quant and FloatRS-fp predictions at sigma = 0.25
for n in 100 1000 10000; do
    for method in float-fp int; do
        model=$RUNS/cnn-0.25.int8.pt; [ "$method" = float-fp ] && model=$RUNS/cnn-0.25.pt
        $BIN/qrobust predict "$model" --method $method --sigma 0.25 --n $n --alpha 0.001 --num-examples 500 \
            --noise-bank --seed 0 --overwrite --output "$OUT/predict/n-$n-$method.tsv"
    done
done
for alpha in 0.1 0.01 0.0001; do
    $BIN/qrobust predict $RUNS/cnn-0.25.int8.pt --method int --sigma 0.25 --n 1000 --alpha $alpha --num-examples 500 \
        --noise-bank --seed 0 --overwrite --output "$OUT/predict/alpha-$alpha-int.tsv"
done
$BIN/python bench/summarize_predictions.py "$OUT"/predict/n-*.tsv "$OUT"/predict/alpha-*.tsv | tee "$OUT/predict/table.md"
