set -e
B=.venv/bin
$B/qrobust train --init runs/intrs/cnn-0.5.pt --qat --input-margin 382 --noise discrete --sigma 0.5 --epochs 2 --lr 0.005 --batch-size 128 --seed 0 --resume --output runs/intrs-margin/cnn-0.5-qat.pt
$B/qrobust quantize runs/intrs-margin/cnn-0.5-qat.pt --overwrite --output runs/intrs-margin/cnn-0.5.int8.pt
for m in int float-quant; do
$B/qrobust certify runs/intrs-margin/cnn-0.5.int8.pt --method $m --sigma 0.5 --n0 100 --n 10000 --alpha 0.001 --num-examples 500 --noise-bank --seed 0 --overwrite --output runs/intrs-margin/certify-$m-0.5.tsv
done
