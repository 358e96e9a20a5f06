#!/usr/bin/env bash
# `container machine create --no-boot` for a small and a large image: the design says create
# is O(1) in the image's size (a qcow2 overlay over the image's base disk), so the ratio
# large/small should be about 1. For scale, `qemu-img create` of the same overlay by hand.
#
#   bench/machine-create.sh [ROUNDS]   ROUNDS: 10 per image
#
# Images: busybox (small) and debian (large) test images, pulled first (which builds their
# ext4 base disks) and warmed by one create + rm each; then ROUNDS rounds of create --no-boot
# (timed) and rm (timed apart) of each. The raw side is `qemu-img create -f qcow2 -b
# base.ext4` with the backing format and virtual size of a machine's own disk.
# `run true` on a running machine is measured by bench/exec.sh.
# Runs in a network namespace of its own with a service of its own (bench/lib.sh).
# CONTAINER: the CLI (default target/install/bin/container, from scripts/build.sh). Needs root.
set -euo pipefail
self=$(realpath "$0")
cd "$(dirname "$self")/.."
# shellcheck source=bench/lib.sh
. bench/lib.sh
bench_enter_netns "$self" "$@"
rounds=${1:-10}
bench_start

declare -A ref base creates removes raws alloc res
for image in busybox debian; do
  ref[$image]=$(bench_push "$image")
  "$cli" image pull -q "${ref[$image]}"
  "$cli" machine create "${ref[$image]}" --name "bench-warm-$image" --no-boot >/dev/null
  disk=$CONTAINER_ROOT/machines/bench-warm-$image/disk.qcow2
  info=$(qemu-img info --output json "$disk")
  base[$image]=$(jq -r '."full-backing-filename" // ."backing-filename"' <<<"$info")
  base[$image.fmt]=$(jq -r '."backing-filename-format" // "raw"' <<<"$info")
  base[$image.size]=$(jq -r '."virtual-size"' <<<"$info")
  bench_rm "bench-warm-$image"
  creates[$image]='' removes[$image]='' raws[$image]=''
done

for i in $(seq 1 "$rounds"); do
  for image in busybox debian; do
    name=bench-create-$image-$i
    sync
    t0=$(now)
    "$cli" machine create "${ref[$image]}" --name "$name" --no-boot >/dev/null
    c=$(since "$t0")
    alloc[$image]=$("$cli" machine ls --format json | jq -r --arg n "$name" '.[] | select(.id == $n) | .diskAllocated')
    t0=$(now)
    bench_rm "$name"
    r=$(since "$t0")
    sync
    t0=$(now)
    qemu-img create -q -f qcow2 -F "${base[$image.fmt]}" -b "${base[$image]}" "$work/raw.qcow2" "${base[$image.size]}"
    q=$(since "$t0")
    rm -f "$work/raw.qcow2"
    creates[$image]+=" $c" removes[$image]+=" $r" raws[$image]+=" $q"
    echo "round $i $image: create $c s, rm $r s, qemu-img create $q s" >&2
  done
done

ms() { printf '%.1f' "$(echo "$1 * 1000" | bc)"; }
echo
echo "container machine create --no-boot (median of $rounds, ms; $(nproc) cores):"
printf '  %-8s %8s %12s %8s %10s %14s %16s\n' image create "qemu-img" "rm" "base disk" "overlay alloc" "ours/qemu-img"
for image in busybox debian; do
  # shellcheck disable=SC2086 # word splitting of the lists is intended
  c=$(median ${creates[$image]}) r=$(median ${removes[$image]}) q=$(median ${raws[$image]})
  res[$image]=$c
  printf '  %-8s %8s %12s %8s %10s %14s %16s\n' "$image" "$(ms "$c")" "$(ms "$q")" "$(ms "$r")" \
    "$(du -h "${base[$image]}" | cut -f1)" "$(numfmt --to=iec "${alloc[$image]}")" "$(ratio "$c" "$q")"
done
echo "  ratio large/small (debian/busybox create): $(ratio "${res[debian]}" "${res[busybox]}")"
for image in busybox debian; do
  echo "  $image: create [${creates[$image]# }] s"
done
