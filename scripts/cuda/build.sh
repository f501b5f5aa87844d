#!/usr/bin/env sh
# Builds the CUDA variant of the native addon on a machine without a GPU:
# npm/linux-x64-gnu-cuda/beit.linux-x64-gnu-cuda.node (it loads only where an NVIDIA driver is).
#
#   sh scripts/cuda/build.sh            # the addon
#   sh scripts/cuda/build.sh --tests    # and the CUDA test binary of beit-core (compile only)
#
# The toolchain (PyPI wheels, ~1.2 GB) and the CUDA target folder are kept in the cache folder
# (BEIT_CACHE, default ~/.cache/beit) so later builds are incremental.
set -eu
cd "$(dirname "$0")/../.."
BEIT_CACHE=${BEIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/beit}
export BEIT_CUDA_DIR="$BEIT_CACHE/cuda-13.0"
. scripts/cuda/toolchain.sh
set -eu # toolchain.sh, made to be sourced into a shell, turns these off at its end
export CARGO_TARGET_DIR="$BEIT_CACHE/target-cuda"

# The target folder is shared by every checkout on this machine (dependencies stay compiled),
# so cargo could take another checkout's beit crates for fresh: rebuild ours every time.
cargo clean --release -p beit-core -p beit-node
cargo build --release -p beit-node --features cuda
# The cdylib is the addon (what `napi build` copies), named as the variant package expects.
cp "$CARGO_TARGET_DIR/release/libbeit_node.so" npm/linux-x64-gnu-cuda/beit.linux-x64-gnu-cuda.node
ls -l npm/linux-x64-gnu-cuda/beit.linux-x64-gnu-cuda.node
if [ "${1:-}" = "--tests" ]; then
  cargo test --release -p beit-core --features cuda --test cuda --no-run
fi
