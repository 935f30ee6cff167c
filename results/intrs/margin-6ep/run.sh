set -e
B=.venv/bin
D=runs/intrs-margin6
$B/qrobust train --init runs/intrs/cnn-0.5.pt --qat --input-margin 382 --noise discrete --sigma 0.5 --epochs 6 --lr 0.005 --lr-step 4 --batch-size 128 --seed 0 --resume --output $D/cnn-0.5-qat.pt
$B/qrobust quantize $D/cnn-0.5-qat.pt --overwrite --output $D/cnn-0.5.int8.pt
for m in int float-quant; do
$B/qrobust certify $D/cnn-0.5.int8.pt --method $m --sigma 0.5 --n0 100 --n 10000 --alpha 0.001 --num-examples 500 --noise-bank --seed 0 --overwrite --output $D/certify-$m-0.5.tsv
done
set -e
B=.venv/bin
D=runs/intrs-margin6
$B/qrobust train --init runs/intrs/cnn-0.5.pt --sigma 0.5 --epochs 6 --lr 0.005 --lr-step 4 --batch-size 128 --seed 0 --resume --output $D/cnn-0.5-fp-6more.pt
$B/qrobust certify $D/cnn-0.5-fp-6more.pt --method float-fp --sigma 0.5 --n0 100 --n 10000 --alpha 0.001 --num-examples 500 --noise-bank --seed 0 --overwrite --output $D/certify-float-fp-6more-0.5.tsv
