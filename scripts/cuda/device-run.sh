#!/usr/bin/env bash
# Runs on a lent GPU machine (no cargo, no internet), in the repository root, after
# scripts/cuda/device-pack.sh here; carry [".device", "dist"]. One prepared run of at most
# about 8 minutes, so that a second try fits in a 15-minute window:
#   preflight (JSON: driver, missing libraries, GLIBC needed vs present, size sent, torch) ->
#   the measured bf16/TF32/f32 GEMM rates (the roof for MFU) ->
#   CUDA-vs-CPU tests -> pretraining steps (BEiT-B/16 at 224 + the `dall-e` tokenizer at 112
#   online, 40% masked): beit bf16 and PyTorch eager bf16 at each batch size, torch.compile at
#   128, both in f32 at 128.
# Each phase runs under its own timeout (cut to what is left of the deadline), in a process of
# its own while nvidia-smi samples the GPU memory in use, and appends one JSON line to
# $OUT/phases.jsonl; a failed phase is recorded and the run goes on. Logs: $OUT/<phase>.log.
#
#   bash scripts/cuda/device-run.sh                 # on the GPU machine
#   BEIT_DEVICE_FAKE=1 bash scripts/cuda/device-run.sh   # here: the same flow on the CPU
#                                                        # (tiny presets, no GPU, no nvidia-smi)
# Knobs: BATCHES ("64 128 256"), STEPS (10), DEADLINE_S (450).
# MODE=tests: the preflight, the GEMM rates and the CUDA-vs-CPU tests only. MODE=profile instead:
# the CUDA-vs-CPU tests, beit bf16 and PyTorch eager bf16 at batch 128 (the ratio), beit's step
# at batch $PROFILE_BATCH (32) timed, then Nsight Compute's per-kernel summary (GPU time of every
# kernel, by name; CSV in $OUT/ncu-profile.log) of one such step and its tokenizer encode, to
# plan the GPU work from.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/beit-device-out}
mkdir -p "$OUT"
: > "$OUT/phases.jsonl"
FAKE=${BEIT_DEVICE_FAKE:-0}
BATCHES=${BATCHES:-64 128 256}
STEPS=${STEPS:-10}
DEADLINE=$(($(date +%s) + ${DEADLINE_S:-450}))

SENT=$(ls .device/*.xz 2>/dev/null)
for f in $SENT; do xz -d -k -f "$f"; done
chmod +x .device/cuda-tests .device/node 2>/dev/null
NODE=.device/node
[ -x "$NODE" ] || NODE=node
# candle's kernels are PTX, JIT-compiled by the driver at first use: keep them for the next
# process (and the next call while the machine stays warm).
export CUDA_CACHE_PATH="$PWD/.device/jit-cache" CUDA_CACHE_MAXSIZE=4294967296
if [ "$FAKE" = 1 ]; then
  DEVICE=cpu PRESET=tiny BATCHES=${FAKE_BATCHES:-2} STEPS=2 WARMUP=1
  PYTHON=${PYTHON:-$HOME/.cache/beit/bench-venv/bin/python}
else
  DEVICE=cuda PRESET=base WARMUP=3 PYTHON=python3
  # The CUDA 13 runtime libraries of the host's Python environment (the build has no RPATH).
  LIBS=$(python3 -c 'import glob, nvidia, os; print(":".join(d for p in nvidia.__path__ for d in glob.glob(os.path.join(p, "*", "lib")) + glob.glob(os.path.join(p, "*", "*", "lib"))))' 2>/dev/null)
  export LD_LIBRARY_PATH="${LIBS:-}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export NAPI_RS_NATIVE_LIBRARY_PATH="$PWD/.device/beit.node"
fi

# phase NAME LIMIT_S COMMAND...: runs COMMAND under min(LIMIT_S, time left), sampling GPU
# memory, and appends {"phase", "rc", "timed_out", "seconds", "peak_gpu_mib", "result"} where
# result is the last JSON line the command printed (or null).
phase() {
  local name=$1 limit=$2
  shift 2
  local left=$((DEADLINE - $(date +%s)))
  if [ "$left" -lt 15 ]; then
    echo "{\"phase\":\"$name\",\"skipped\":\"deadline\"}" | tee -a "$OUT/phases.jsonl"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local sampler=""
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$OUT/$name.mem" 2>/dev/null &
    sampler=$!
  fi
  local t0 t1 rc
  t0=$(date +%s.%N)
  timeout --kill-after=5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  [ -n "$sampler" ] && { kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null; }
  local peak result
  peak=$(sort -n "$OUT/$name.mem" 2>/dev/null | tail -n 1)
  result=$(grep '^{' "$OUT/$name.log" | tail -n 1)
  local timed_out=false
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && timed_out=true
  echo "{\"phase\":\"$name\",\"rc\":$rc,\"timed_out\":$timed_out,\"seconds\":$(awk "BEGIN { printf \"%.1f\", $t1 - $t0 }"),\"peak_gpu_mib\":${peak:-null},\"result\":${result:-null}}" \
    | tee -a "$OUT/phases.jsonl"
}

phase preflight 30 python3 scripts/cuda/preflight.py .device/beit.node .device/cuda-tests "$NODE" --sent $SENT dist
[ "$FAKE" = 1 ] || phase gemm-roof 30 python3 scripts/cuda/gemm_roof.py
phase cuda-tests 150 .device/cuda-tests --test-threads=1 --nocapture
grep -E "^test |test result|panicked" "$OUT/cuda-tests.log" | head -n 40

[ "${MODE:-bench}" = tests ] && { echo "phases: $OUT/phases.jsonl"; exit 0; }

beit=("$NODE" dist/bench/pretrain-step.js --device "$DEVICE" --preset "$PRESET" --steps "$STEPS" --warmup "$WARMUP")
torch_=("$PYTHON" scripts/cuda/bench_pytorch.py --device "$DEVICE" --preset "$PRESET" --steps "$STEPS" --warmup "$WARMUP")
MAIN=128
[ "$FAKE" = 1 ] && MAIN=$BATCHES
if [ "${MODE:-bench}" = profile ]; then
  phase "beit-bf16-b$MAIN" 75 "${beit[@]}" --precision bf16 --batch-sizes "$MAIN"
  phase "pytorch-bf16-b$MAIN" 75 "${torch_[@]}" --dtype bf16 --batch-sizes "$MAIN"
  b=${PROFILE_BATCH:-32}
  step=("$NODE" dist/bench/pretrain-step.js --device "$DEVICE" --preset "$PRESET" --batch-sizes "$b")
  phase "beit-bf16-b$b" 60 "${step[@]}" --steps 5 --warmup 2
  ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
  phase ncu-profile 240 "$ncu" --clock-control none --target-processes all --metrics gpu__time_duration.sum \
    --print-summary per-kernel --csv "${step[@]}" --steps 1 --warmup 0
  echo "phases: $OUT/phases.jsonl"
  exit 0
fi

# Most important first: whatever the deadline cuts is at the end.
ordered="$MAIN $(for b in $BATCHES; do [ "$b" != "$MAIN" ] && printf '%s ' "$b"; done)"
for b in $ordered; do
  phase "beit-bf16-b$b" 75 "${beit[@]}" --precision bf16 --batch-sizes "$b"
  phase "pytorch-bf16-b$b" 75 "${torch_[@]}" --dtype bf16 --batch-sizes "$b"
done
phase "pytorch-compile-bf16-b$MAIN" 150 "${torch_[@]}" --dtype bf16 --compile --batch-sizes "$MAIN"
phase "beit-f32-b$MAIN" 75 "${beit[@]}" --precision f32 --batch-sizes "$MAIN"
phase "pytorch-f32-b$MAIN" 75 "${torch_[@]}" --dtype f32 --batch-sizes "$MAIN"
echo "phases: $OUT/phases.jsonl"
