#!/usr/bin/env bash
# Builds a test image from Debian packages and prints the path of its OCI image layout (tag
# `latest`) as the last line of stdout. Nothing is pulled from a public registry.
#
#   tests/images/build.sh NAME [OUTDIR]   one image (recipes/NAME.sh); with OUTDIR, a copy of
#                                         the layout is also placed there and that is printed
#   tests/images/build.sh all             every image, with a time and size line for each
#   tests/images/build.sh list            the recipe names
#   tests/images/build.sh prune           removes cached builds of older recipe versions
#
# Images are cached in ${CONTAINER_TEST_CACHE:-~/.cache/container-test-images}/NAME-HASH, where
# HASH covers the recipe, the files under files/NAME/, this script, lib.sh, oci-pack.py and
# the base image's hash (`# base: NAME` line): a cache hit prints at once. A build happens in a
# temporary directory renamed into place at the end, under a per-image lock, so an interrupted
# or concurrent build never leaves a directory that looks complete.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${CONTAINER_TEST_CACHE:-$HOME/.cache/container-test-images}
name=${1:?usage: build.sh NAME [OUTDIR] | all | list | prune}
outdir=${2:-}

recipes() { for r in "$here"/recipes/*.sh; do basename "$r" .sh; done; }

# The hash of everything that decides an image's content, its base's included.
image_hash() {
  local r=$here/recipes/$1.sh b
  b=$(sed -n '1s/^# base: *//p' "$r")
  {
    cat "$r" "$here/build.sh" "$here/lib.sh" "$here/oci-pack.py"
    if [ -d "$here/files/$1" ]; then
      (cd "$here/files/$1" && find . -type f -print0 | sort -z | xargs -0r sha256sum)
    fi
    if [ -n "$b" ]; then image_hash "$b"; fi
  } | sha256sum | cut -c1-16
}

if [ "$name" = list ]; then
  recipes
  exit 0
fi
if [ "$name" = all ]; then
  for r in $(recipes); do
    start=$(date +%s.%N)
    layout=$("$0" "$r" | tail -n 1)
    printf '%-11s %6.1f s  %6s  %s\n' "$r" "$(echo "$(date +%s.%N) - $start" | bc)" \
      "$(du -sh "$layout" | cut -f1)" "$layout"
  done
  exit 0
fi

if [ "$name" = prune ]; then
  for r in $(recipes); do
    keep=$cache/$r-$(image_hash "$r")
    for d in "$cache/$r"-????????????????; do
      if [ -d "$d" ] && [ "$d" != "$keep" ]; then
        echo "build.sh: removing $d" >&2
        rm -rf --one-file-system "$d"
      fi
    done
  done
  exit 0
fi

recipe=$here/recipes/$name.sh
[ -f "$recipe" ] || {
  echo "build.sh: no recipe $recipe (known: $(recipes | tr '\n' ' '))" >&2
  exit 1
}
base=$(sed -n '1s/^# base: *//p' "$recipe")

out=$cache/$name-$(image_hash "$name")
publish() {
  if [ -n "$outdir" ]; then
    mkdir -p "$outdir"
    rm -rf "${outdir:?}/$name"
    cp -a "$out" "$outdir/$name"
    echo "$outdir/$name"
  else
    echo "$out"
  fi
}
if [ -f "$out/index.json" ]; then
  publish
  exit 0
fi

if [ "$(id -u)" != 0 ]; then
  echo "build.sh: building $name needs root (debootstrap, chroot, mounts); run it with sudo" >&2
  exit 1
fi
mkdir -p "$cache"
base_layout=
if [ -n "$base" ]; then base_layout=$("$0" "$base" | tail -n 1); fi

exec 9>"$cache/.lock-$name"
flock 9
if [ -f "$out/index.json" ]; then  # built by another process while we waited
  publish
  exit 0
fi

# Removes a build directory, unmounting whatever a recipe left mounted in it (deepest first)
# so that nothing outside it is ever touched.
remove_build_dir() {
  awk -v w="$1/" 'index($2, w) == 1 {print $2}' /proc/self/mounts | sort -r \
    | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  rm -rf --one-file-system "$1"
}
# Under the lock, a build directory of this image is the leftover of a killed build.
for stale in "$cache"/.build-"$name"-??????; do
  if [ -d "$stale" ]; then remove_build_dir "$stale"; fi
done
work=$(mktemp -d "$cache/.build-$name-XXXXXX")
trap 'remove_build_dir "$work"' EXIT
start=$(date +%s)
mkdir -p "$work/layers"
(
  export WORK=$work IMAGES=$here BUILD=$here/build.sh BASE_LAYOUT=$base_layout
  # shellcheck source=tests/images/lib.sh
  source "$here/lib.sh"
  set -euo pipefail
  # shellcheck disable=SC1090
  source "$recipe"
) >&2

layers=()
for l in $(find "$work/layers" -mindepth 1 -maxdepth 1 -type d -printf '%f\n' | sort -n); do
  comp=gzip
  if [ -f "$work/layers/$l.compression" ]; then comp=$(cat "$work/layers/$l.compression"); fi
  layers+=("$work/layers/$l:$comp")
done
pack=(python3 "$here/oci-pack.py" pack "$work/oci" --name "$name")
if [ -n "$base_layout" ]; then pack+=(--base "$base_layout"); fi
if [ -f "$work/config.json" ]; then pack+=(--config "$work/config.json"); fi
"${pack[@]}" "${layers[@]}"
rm -rf "$out"
mv -T "$work/oci" "$out"
echo "build.sh: $name built in $(($(date +%s) - start)) s ($(du -sh "$out" | cut -f1))" >&2
publish
