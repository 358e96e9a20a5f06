#!/usr/bin/env bash
# `container machine clone` of a stopped machine and `machine snapshot create`/`restore`,
# for a disk holding little and a disk holding much: clones and snapshots are overlay
# chains (a hard link and an empty overlay), so their time should not grow with what the
# disk holds (ratio large/small about 1). For scale, the plain ways to copy the same disk:
# `cp --reflink=auto` of the disk file (a full copy on ext4, which has no reflink) and
# `qemu-img convert -O qcow2` (a flattened copy).
#
#   bench/clone.sh [ROUNDS] [SMALL_MIB] [LARGE_MIB]   (5, 64, 1024)
#
# One stopped debian machine per size, never booted; its disk is filled with that many MiB
# through `qemu-io` (data the guest would have written; the machine is not started, so its
# filesystem's view of them does not matter here). Each round times, per size: a clone (then
# removed, untimed), `cp --reflink=auto` and `qemu-img convert` of the disk (then removed),
# and a snapshot create, restore and rm. `cp` and `convert` read a copy of the disk taken
# before the first clone, when one file held all its data. Runs in a network namespace of its own with a
# service of its own (bench/lib.sh). CONTAINER: the CLI (default target/install/bin/container,
# from scripts/build.sh). Needs root.
set -euo pipefail
self=$(realpath "$0")
cd "$(dirname "$self")/.."
# shellcheck source=bench/lib.sh
. bench/lib.sh
bench_enter_netns "$self" "$@"
rounds=${1:-5}
small=${2:-64}
large=${3:-1024}
bench_start

ref=$(bench_push debian)
"$cli" image pull -q "$ref"
declare -A clones cps converts snaps restores
for size in "$small" "$large"; do
  name=bench-src-$size
  "$cli" machine create "$ref" --name "$name" --no-boot >/dev/null
  # Past the base disk's end, so every MiB is new data in the machine's own overlay.
  qemu-io -f qcow2 -c "write -P 0xa5 1G ${size}M" "$CONTAINER_ROOT/machines/$name/disk.qcow2" >/dev/null
  # The plain side copies the disk as it was before any clone: one file holding all of it
  # (after a clone the machine's own file is an empty overlay over a shared layer).
  cp "$CONTAINER_ROOT/machines/$name/disk.qcow2" "$work/disk-$size.qcow2"
  clones[$size]='' cps[$size]='' converts[$size]='' snaps[$size]='' restores[$size]=''
done

for i in $(seq 1 "$rounds"); do
  for size in "$small" "$large"; do
    src=bench-src-$size
    disk=$work/disk-$size.qcow2
    sync
    t0=$(now)
    "$cli" machine clone "$src" "bench-clone-$size-$i" >/dev/null
    c=$(since "$t0")
    bench_rm "bench-clone-$size-$i"
    sync
    t0=$(now)
    cp --reflink=auto "$disk" "$work/copy.qcow2"
    sync "$work/copy.qcow2"
    p=$(since "$t0")
    rm -f "$work/copy.qcow2"
    sync
    t0=$(now)
    qemu-img convert -O qcow2 "$disk" "$work/copy.qcow2"
    sync "$work/copy.qcow2"
    v=$(since "$t0")
    rm -f "$work/copy.qcow2"
    t0=$(now)
    "$cli" machine snapshot create "$src" "s$i" >/dev/null
    s=$(since "$t0")
    t0=$(now)
    "$cli" machine snapshot restore "$src" "s$i" >/dev/null
    r=$(since "$t0")
    "$cli" machine snapshot rm "$src" "s$i" >/dev/null
    clones[$size]+=" $c" cps[$size]+=" $p" converts[$size]+=" $v" snaps[$size]+=" $s" restores[$size]+=" $r"
    echo "round $i ${size} MiB: clone $c s, cp $p s, qemu-img convert $v s, snapshot $s s, restore $r s" >&2
  done
done

ms() { printf '%.1f' "$(echo "$1 * 1000" | bc)"; }
echo
echo "clone and snapshot of a stopped machine (median of $rounds, ms; $(nproc) cores):"
printf '  %-10s %8s %12s %16s %10s %10s\n' data clone "cp --reflink" "qemu-img convert" snapshot restore
declare -A res
for size in "$small" "$large"; do
  # shellcheck disable=SC2086 # word splitting of the lists is intended
  c=$(median ${clones[$size]}) p=$(median ${cps[$size]}) v=$(median ${converts[$size]})
  # shellcheck disable=SC2086
  s=$(median ${snaps[$size]}) r=$(median ${restores[$size]})
  res[$size.c]=$c res[$size.s]=$s res[$size.r]=$r
  printf '  %-10s %8s %12s %16s %10s %10s\n' "${size} MiB" "$(ms "$c")" "$(ms "$p")" "$(ms "$v")" "$(ms "$s")" "$(ms "$r")"
done
echo "  ratio large/small: clone $(ratio "${res[$large.c]}" "${res[$small.c]}"), snapshot $(ratio "${res[$large.s]}" "${res[$small.s]}"), restore $(ratio "${res[$large.r]}" "${res[$small.r]}")"
