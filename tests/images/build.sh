#!/usr/bin/env bash
# Builds a test image from Debian packages and prints the path of its OCI image layout (tag
# `latest`). Images are cached outside the clone, keyed by the hash of their recipe and of the
# build tooling, so CI rebuilds only what changed.
#
#   tests/images/build.sh NAME      one image (recipes/NAME.sh)
#   tests/images/build.sh all       every image
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${CONTAINER_TEST_CACHE:-$HOME/.cache/container-test-images}
name=${1:?usage: build.sh NAME|all}

if [ "$name" = all ]; then
  for r in "$here"/recipes/*.sh; do
    "$0" "$(basename "$r" .sh)" >/dev/null
  done
  exit 0
fi

recipe=$here/recipes/$name.sh
[ -f "$recipe" ] || { echo "build.sh: no recipe $recipe" >&2; exit 1; }
# A recipe may build on another (`# base: debian`): its hash covers the base's too.
base=$(sed -n 's/^# base: *//p' "$recipe")
hash=$(cat "$recipe" "$here/build.sh" "$here/oci-pack.py" \
  ${base:+"$here/recipes/$base.sh"} | sha256sum | cut -c1-16)
out=$cache/$name-$hash
if [ -f "$out/index.json" ]; then
  echo "$out"
  exit 0
fi

mkdir -p "$cache"
work=$(mktemp -d "$cache/.build-$name-XXXXXX")
trap 'rm -rf "$work"' EXIT
start=$(date +%s)
# The recipe fills $work/layers/N (one tree per layer, in order) and writes $work/config.json.
BUILD="$here/build.sh" WORK="$work" bash -euo pipefail "$recipe" >&2
layers=()
for l in $(ls "$work/layers" | grep -E "^[0-9]+$" | sort -n); do
  comp=gzip
  [ -f "$work/layers/$l.compression" ] && comp=$(cat "$work/layers/$l.compression")
  layers+=("$work/layers/$l:$comp")
done
python3 "$here/oci-pack.py" "$work/oci" "$work/config.json" "${layers[@]}"
rm -rf "$out"
mv "$work/oci" "$out"
echo "build.sh: $name built in $(( $(date +%s) - start )) s" >&2
echo "$out"
