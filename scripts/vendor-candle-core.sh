#!/bin/sh
# Re-creates crate/vendor/candle-core: candle-core $version downloaded from crates.io, checked
# against its checksum (that of Cargo.lock before the patch), with
# crate/vendor/candle-core-backprop.patch applied. Its tests, benches and examples are left out
# (with their manifest entries).
#
# Why a patched copy: candle's `Tensor::backward` starts every gradient as a zero tensor and adds
# each contribution into a fresh one, so every gradient edge costs a zero fill, an add pass and
# two allocations. The patch stores a node's first contribution as is (upstream:
# huggingface/candle pull requests 3578 and 3822, open). It also fixes two backward passes that
# only the GPU path uses (on the CPU beit has its own ops), found by the first GPU run: max_pool2d
# gave a window's single maximum a quarter of its gradient (multiplied by the mask's mean instead
# of dividing by the maxima's count), and upsample_nearest1d/2d overwrote the gradient that other
# uses of their input had added. Once a candle release has these, drop the [patch.crates-io]
# entry in Cargo.toml and crate/vendor.
#
# To move to another candle version: set `version` and `checksum` below (crates.io lists the
# checksum), run this, and fix the patch if it no longer applies.
set -eu
cd "$(dirname "$0")/.."
version=0.11.1
checksum=d11c8be87cfbaef9ebb62fb3f850d1fc8e00cc1d11d393fdbe55a4d5c2cdb325
dest=crate/vendor/candle-core
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

curl -sSfL -o "$tmp/crate.tar.gz" "https://static.crates.io/crates/candle-core/candle-core-$version.crate"
echo "$checksum  $tmp/crate.tar.gz" | sha256sum -c --quiet
tar -xzf "$tmp/crate.tar.gz" -C "$tmp"
src="$tmp/candle-core-$version"
(cd "$src" && patch -p1 --quiet <"$OLDPWD/crate/vendor/candle-core-backprop.patch")

rm -rf "$dest"
mkdir -p "$dest"
cp -r "$src/src" "$src/LICENSE" "$dest/"
# The manifest without the targets and dev-dependencies left out.
awk '
  /^\[/ { skip = ($0 ~ /^\[\[(example|test|bench)\]\]$/ || $0 ~ /^\[dev-dependencies/) }
  !skip
' "$src/Cargo.toml" >"$dest/Cargo.toml"
# rustfmt's defaults, as candle is formatted (not this workspace's rustfmt.toml above it).
: >"$dest/rustfmt.toml"
echo "vendored candle-core $version (patched) into $dest"
