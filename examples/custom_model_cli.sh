#!/bin/sh
# Your own model on the command line: train it by naming its factory, then certify its checkpoint.
# A checkpoint records the factory's name but never imports it: certify needs --model too.
#   sh examples/custom_model_cli.sh [OUTPUT_DIR] [EPOCHS] [EXAMPLES]
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-runs/custom-model}
epochs=${2:-10}
examples=${3:-100}
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"  # makes examples.my_cnn importable
qrobust() { "${PYTHON:-python}" -m qrobust "$@"; }

qrobust train --model examples.my_cnn:my_cnn --model-option width=8 --dataset digits \
    --sigma 0.25 --epochs "$epochs" --batch-size 64 --lr 0.05 --output "$out/my_cnn.pt" --overwrite
qrobust certify "$out/my_cnn.pt" --model examples.my_cnn:my_cnn --sigma 0.25 --n0 20 --n 200 --alpha 0.01 \
    --num-examples "$examples" --output "$out/certify.tsv" --overwrite
qrobust analyze "$out/certify.tsv"
