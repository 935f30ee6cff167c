# Quantization-safety certificates of int8 (PTQ) versions of an MLP and the small CNN on Fashion-MNIST.
set -e
B=.venv/bin
$B/qrobust train --model mlp --epochs 3 --lr 0.05 --batch-size 128 --seed 0 --resume --output runs/verify/mlp.pt
$B/qrobust quantize runs/verify/mlp.pt --overwrite --output runs/verify/mlp.int8.pt
$B/qrobust verify-quantization runs/verify/mlp.pt runs/verify/mlp.int8.pt --num-examples 1000 --overwrite --output results/admm/verify-mlp.json
$B/qrobust quantize runs/intrs/cnn-0.25.pt --overwrite --output runs/verify/cnn.int8.pt
$B/qrobust verify-quantization runs/intrs/cnn-0.25.pt runs/verify/cnn.int8.pt --num-examples 1000 --overwrite --output results/admm/verify-cnn.json
