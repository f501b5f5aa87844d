#!/bin/sh
# Real multi-megapixel JPEG photographs for `npm run bench:decode`, from Debian's
# mate-backgrounds package (extracted, not installed) into .cache/photos.
set -eu
dest="${1:-.cache/photos}"
if [ -n "$(ls "$dest" 2>/dev/null)" ]; then
  echo "photos already in $dest"
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download mate-backgrounds >/dev/null && dpkg -x mate-backgrounds_*.deb x)
mkdir -p "$dest"
find "$work/x" -type f \( -iname '*.jpg' -o -iname '*.jpeg' \) -exec cp {} "$dest/" \;
echo "$(ls "$dest" | wc -l) photos in $dest"
