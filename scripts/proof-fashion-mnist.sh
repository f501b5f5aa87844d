#!/bin/sh
# The README's results on the full Fashion-MNIST (Debian package dataset-fashion-mnist: 60,000
# training and 10,000 test images): tokenizer -> MIM pretraining -> linear probes (pretrained vs
# random backbone vs raw pixels) -> fine-tuning (pretrained vs from scratch, equal budgets).
# Run from the repository root after `npm install`; about an hour on 2 cores.
set -eu
out="${1:-runs/proof}"
beit="node dist/cli.js"
model="--preset mini --image-size 28 --patch-size 4 --channels 1"
mkdir -p "$out"
t() { /usr/bin/time -f "%e s  $*" -a -o "$out/times.txt" "$@"; }
# Each step is skipped when its result exists, so the script can be re-run after a stop.
done_() { [ -e "$1" ] && echo "have $1"; }
done_ "$out/tokenizer/evaluation.json" || t $beit tokenizer --data fashion-mnist --preset tiny --steps 600 --batch-size 32 --out "$out/tokenizer" --quiet
done_ "$out/pretrain/curves.svg" || t $beit pretrain --data fashion-mnist --tokenizer "$out/tokenizer/tokenizer.safetensors" $model \
  --epochs 8 --batch-size 64 --lr 1.5e-3 --drop-path 0.1 --out "$out/pretrain" --quiet
done_ "$out/probe-pretrained.json" || t $beit probe --data fashion-mnist --init "$out/pretrain/checkpoint.safetensors" --layer 4 --epochs 10 --lr 1e-2 --out "$out/probe-pretrained.json" --quiet
done_ "$out/probe-random.json" || t $beit probe --data fashion-mnist --random-like "$out/pretrain/checkpoint.safetensors" --seed 1 --layer 4 --epochs 10 --lr 1e-2 --out "$out/probe-random.json" --quiet
done_ "$out/probe-pixels.json" || t $beit probe --data fashion-mnist --pixels --epochs 10 --lr 1e-2 --out "$out/probe-pixels.json" --quiet
done_ "$out/finetune-pretrained/curves.svg" || t $beit finetune --data fashion-mnist --init "$out/pretrain/checkpoint.safetensors" \
  --epochs 15 --eval-every 5 --batch-size 64 --lr 1e-3 --layer-decay 0.75 --drop-path 0.1 --scale-min 0.6 --out "$out/finetune-pretrained" --quiet
done_ "$out/finetune-scratch/curves.svg" || t $beit finetune --data fashion-mnist $model \
  --epochs 15 --eval-every 5 --batch-size 64 --lr 1e-3 --layer-decay 0.75 --drop-path 0.1 --scale-min 0.6 --out "$out/finetune-scratch" --quiet
cat "$out/times.txt"
