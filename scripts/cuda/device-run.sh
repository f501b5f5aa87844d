#!/usr/bin/env bash
# Runs on a lent H100/H200 machine, in the repository root, after scripts/cuda/device-pack.sh
# here (carry .device and dist). In one go: CPU-vs-CUDA agreement tests, then the pretraining
# benchmark of beit (bf16, batch sizes 64/128/256, and f32 at 128) and of PyTorch eager
# (scripts/cuda/bench_pytorch.py), each batch size in its own process with nvidia-smi sampling
# the GPU memory in use, so that both sides' peaks are measured the same way. Results go to
# $OUT (the device tool's output folder).
#
#   bash scripts/cuda/device-run.sh [batch sizes, default "64 128 256"] [timed steps, default 10]
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/beit-device-out}
mkdir -p "$OUT"
BATCHES=${1:-64 128 256}
STEPS=${2:-10}

xz -d -k -f .device/*.xz
chmod +x .device/cuda-tests .device/node
# The CUDA 13 runtime libraries of the host's Python environment (the build has no RPATH).
LIBS=$(python3 -c 'import glob, nvidia, os; print(":".join(d for p in nvidia.__path__ for d in glob.glob(os.path.join(p, "*", "lib")) + glob.glob(os.path.join(p, "*", "*", "lib"))))')
export LD_LIBRARY_PATH="$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export NAPI_RS_NATIVE_LIBRARY_PATH="$PWD/.device/beit.node"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"

echo "== CUDA vs CPU agreement tests"
.device/cuda-tests --test-threads=1 --nocapture > "$OUT/cuda-tests.txt" 2>&1
echo "exit $?" >> "$OUT/cuda-tests.txt"
grep -E "test result|panicked|FAILED|^exit" "$OUT/cuda-tests.txt"

# Runs "$@" while sampling the GPU's used memory; appends {"peak_gpu_mib": N} to its JSON line.
sampled() {
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$OUT/mem.txt" &
  local sampler=$!
  local line
  line=$("$@" 2>>"$OUT/stderr.txt" | tail -n 1)
  kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null
  local peak
  peak=$(sort -n "$OUT/mem.txt" | tail -n 1)
  case "$line" in
    \{*\}) ;;
    *) line="{\"command\":\"$*\",\"error\":\"no JSON result; see stderr.txt\"}" ;;
  esac
  echo "${line%\}},\"peak_gpu_mib\":${peak:-null}}" | tee -a "$OUT/bench.jsonl"
}

echo "== pretraining benchmark (BEiT-B/16 at 224 + dall-e tokenizer at 112)"
for b in $BATCHES; do
  sampled .device/node dist/bench/pretrain-step.js --device cuda --precision bf16 --batch-sizes "$b" --steps "$STEPS" --warmup 3
  sampled python3 scripts/cuda/bench_pytorch.py --batch-sizes "$b" --steps "$STEPS" --warmup 3
done
sampled .device/node dist/bench/pretrain-step.js --device cuda --precision f32 --batch-sizes 128 --steps "$STEPS" --warmup 3
sampled python3 scripts/cuda/bench_pytorch.py --dtype f32 --batch-sizes 128 --steps "$STEPS" --warmup 3
