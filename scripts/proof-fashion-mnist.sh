#!/bin/sh
# The README's results on the full Fashion-MNIST (Debian package dataset-fashion-mnist: 60,000
# training and 10,000 test images): tokenizer -> MIM pretraining -> linear probes (pretrained vs
# random backbone vs raw pixels) -> fine-tuning (pretrained vs from scratch, equal budgets).
# Run from the repository root after `npm install`; about 75 minutes on 2 idle cores.
set -eu
out="${1:-runs/proof}"
beit="node dist/cli.js"
model="--preset mini --image-size 28 --patch-size 4 --channels 1"
mkdir -p "$out"
t() { /usr/bin/time -f "%e s  $*" -a -o "$out/times.txt" "$@"; }
# A finished step leaves $out/NAME.done and is skipped when the script is re-run after a stop;
# an unfinished one is started again from nothing.
step() {
  name="$1"; shift
  if [ -e "$out/$name.done" ]; then echo "have $name"; return; fi
  rm -rf "$out/$name" "$out/$name.json"
  t "$@"
  touch "$out/$name.done"
}
step tokenizer $beit tokenizer --data fashion-mnist --preset tiny --steps 600 --batch-size 32 --out "$out/tokenizer" --quiet
step pretrain $beit pretrain --data fashion-mnist --tokenizer "$out/tokenizer/checkpoint.safetensors" $model \
  --epochs 8 --batch-size 64 --lr 1.5e-3 --drop-path 0.1 --out "$out/pretrain" --quiet
step probe-pretrained $beit probe --data fashion-mnist --init "$out/pretrain/checkpoint.safetensors" --layer 4 --epochs 10 --lr 1e-2 --out "$out/probe-pretrained.json" --quiet
step probe-random $beit probe --data fashion-mnist --random-like "$out/pretrain/checkpoint.safetensors" --seed 1 --layer 4 --epochs 10 --lr 1e-2 --out "$out/probe-random.json" --quiet
step probe-pixels $beit probe --data fashion-mnist --pixels --epochs 10 --lr 1e-2 --out "$out/probe-pixels.json" --quiet
step finetune-pretrained $beit finetune --data fashion-mnist --init "$out/pretrain/checkpoint.safetensors" \
  --epochs 20 --eval-every 5 --batch-size 64 --lr 1e-3 --layer-decay 0.75 --drop-path 0.1 --scale-min 0.6 --out "$out/finetune-pretrained" --quiet
step finetune-scratch $beit finetune --data fashion-mnist $model \
  --epochs 20 --eval-every 5 --batch-size 64 --lr 1e-3 --layer-decay 0.75 --drop-path 0.1 --scale-min 0.6 --out "$out/finetune-scratch" --quiet
cat "$out/times.txt"
