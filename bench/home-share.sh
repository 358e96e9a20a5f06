#!/usr/bin/env bash
# The shared home (virtiofs, served by virtiofsd as its owner) against the guest's own disk
# (ext4 on virtio-blk) and against the host doing the same work on the same files, in one
# run, inside a Debian machine (the test image `devtools`: Debian with git and sqlite3).
#
#   bench/home-share.sh [ROUNDS] [FILES] [VARIANTS]   (3, 20000, "default")
#   BENCH_OPS="walk status" measures only those (default: all five below; `read` reads
#   what `write` wrote).
#
# VARIANTS: space-separated virtiofsd option sets, each comma-separated without the leading
# dashes (`cache=never,thread-pool-size=4`, `writeback`), given to the service as
# `[runtime] virtiofsd-args`; `default` adds nothing (the service's own command line). For
# each variant the service is restarted with that config and the machine stopped and started
# again. The guest disk and the host are measured in the first variant's rounds only (the
# variant changes neither); every variant's ratios are against those medians.
#
# What is timed (inside the guest, from its clock, so `machine run`'s own cost is not in it;
# on the host the same script as the same user), per location:
#   walk    `find DIR -name .git -prune -o -type f -print0 | xargs -0 stat -c %s`: a metadata
#           walk over FILES files (20 files a directory); warm: an untimed walk and status
#           ran just before (each round), so each timed one is what a second `find` or
#           `git status` meets.
#   status  `git status --porcelain` in a clean repository of those FILES files (committed
#           and packed); warm the same way.
#   write   `dd bs=1M count=1024 conv=fsync` of 1 GiB: streaming write to stable storage.
#   read    `dd bs=1M` of that file to /dev/null, cold: the guest's caches dropped
#           (`drop_caches`) and the host's cache of the file dropped (`dd iflag=nocache`: of
#           the file itself for the share and the host, of the machine's disk.qcow2 for the
#           guest disk), so each side reads from the host's disk.
#   untar   `tar -xf` of a source tree (4000 small files, 64 B to 8 KiB, in 200 directories,
#           generated from a fixed seed) into an empty directory; no sync after it.
# Goal (issue 15): the walk and `git status` within 3x of the guest disk.
# Locations: share = the user's home as the machine sees it; guest-disk = /var/tmp on the
# machine's disk; host = the same directory as the share, on the host.
#
# virtiofsd (unprivileged, so without file handles) holds a descriptor per host file the
# guest has looked up: the walk needs a hard open-file limit above FILES + 5000 (the service
# raises it to 2^20 where it may; a sandbox without CAP_SYS_RESOURCE keeps the shell's, and
# past it the guest's `find` fails with ENFILE, which the walk reports).
#
# The machine user is a regular host user (BENCH_USER, default `ctbench`, created with
# useradd when missing and removed at the end if this script created it), so virtiofsd runs
# as that user as it does for anyone. Its home holds the work directory, removed at the end.
# Runs in a network namespace of its own with a service of its own (bench/lib.sh). Needs
# root; release binaries (`PROFILE=release scripts/build.sh`).
set -euo pipefail
self=$(realpath "$0")
cd "$(dirname "$self")/.."
# shellcheck source=bench/lib.sh
. bench/lib.sh
bench_enter_netns "$self" "$@"
rounds=${1:-3}
files=${2:-20000}
read -r -a variants <<<"${3:-default}"
bench_start
# The socket is in $work: the bench user must reach it.
chmod 755 "$work"

user=${BENCH_USER:-ctbench}
made_user=0
if ! id "$user" >/dev/null 2>&1; then
  useradd --create-home --shell /bin/bash --user-group "$user"
  made_user=1
fi
uhome=$(getent passwd "$user" | cut -d: -f6)
dir=$uhome/home-share-bench
gdir=/var/tmp/home-share-bench
machine=bench-home
hs_cleanup() {
  bench_cleanup
  rm -rf --one-file-system "$dir"
  [ "$made_user" = 0 ] || userdel --remove "$user" 2>/dev/null
}
trap hs_cleanup EXIT
as_user() { runuser -u "$user" -- env HOME="$uhome" USER="$user" "$@"; }
cli_user() {
  as_user env CONTAINER_SOCKET="$CONTAINER_SOCKET" "$cli" "$@"
}
in_guest() { cli_user machine run -n "$machine" --no-shell -w / -- "$@"; }

# The work: one script, at the same path on the host and in the guest.
rm -rf --one-file-system "$dir"
mkdir -p "$dir"
cat >"$dir/work.sh" <<'EOF'
#!/bin/sh
# work.sh OP DIR FILES: prints the seconds OP took on DIR (FILES: how many the walk finds).
set -eu
op=$1 d=$2
t() { date +%s.%N; }
case $op in
  walk)
    t0=$(t)
    n=$(find "$d/repo" -name .git -prune -o -type f -print0 | xargs -0 stat -c %s | wc -l)
    [ "$n" = "$3" ] || { echo "walk: $n files of $3" >&2; exit 1; } ;;
  status) cd "$d/repo"; t0=$(t); n=$(git status --porcelain | wc -l); [ "$n" = 0 ] || { echo "git status: $n changes" >&2; exit 1; } ;;
  write) rm -f "$d/big"; t0=$(t); dd if=/dev/zero of="$d/big" bs=1M count=1024 conv=fsync status=none ;;
  read) t0=$(t); dd if="$d/big" of=/dev/null bs=1M status=none ;;
  untar) rm -rf "$d/untar"; mkdir "$d/untar"; t0=$(t); tar -xf "$d/src.tar" -C "$d/untar" ;;
  *) echo "work.sh: unknown $op" >&2; exit 2 ;;
esac
t1=$(t)
awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f\n", b - a }'
EOF
chmod 755 "$dir/work.sh"

echo "generating $files files and a source tree of 4000 files..." >&2
python3 - "$dir" "$files" <<'EOF'
import os, random, sys
root, files = sys.argv[1], int(sys.argv[2])
rng = random.Random(15)
for i in range(files):
    d = os.path.join(root, "repo", f"d{i // 400:03}", f"s{(i // 20) % 20:02}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i:05}.txt"), "w") as f:
        f.write(f"file {i}\n" * (1 + i % 7))
for i in range(4000):
    d = os.path.join(root, "src", f"m{i // 20:03}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"unit{i:04}.c"), "wb") as f:
        f.write(rng.randbytes(rng.randint(64, 8192)).hex()[: rng.randint(64, 8192)].encode())
EOF
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$dir/src" -cf "$dir/src.tar" .
rm -rf "$dir/src"
chown -R "$user:" "$dir"
as_user sh -ec "cd '$dir/repo' && git init -q && git add -A && git -c gc.auto=0 -c user.name=bench -c user.email=bench@example.invalid commit -qm tree && git gc -q"
# The guest disk's copy is unpacked from one archive: copying 20,000 files over the share
# would take minutes under emulation.
as_user tar -C "$dir" -cf "$dir/repo.tar" repo

ref=$(bench_push devtools)
cli_user image pull -q "$ref" >/dev/null
cli_user machine create "$ref" --name "$machine" --cpus 2 --memory 2G --no-boot >/dev/null
conf=$XDG_CONFIG_HOME/container/config.toml
mkdir -p "$(dirname "$conf")"

drop_guest() { cli_user machine run -n "$machine" --root --no-shell -- sh -c 'sync; echo 3 > /proc/sys/vm/drop_caches'; }
drop_host_file() { dd if="$1" iflag=nocache count=0 status=none; }

declare -A res
read -r -a ops <<<"${BENCH_OPS:-walk status write read untar}"
for variant in "${variants[@]}"; do
  args=()
  if [ "$variant" != default ]; then
    IFS=, read -r -a opts <<<"$variant"
    for o in "${opts[@]}"; do args+=("--$o"); done
  fi
  list=
  for a in "${args[@]}"; do list+="${list:+, }\"$a\""; done
  printf '[runtime]\nvirtiofsd-args = [%s]\n' "$list" >"$conf"
  "$cli" system stop >/dev/null
  "$cli" system start >/dev/null
  cli_user machine stop "$machine" >/dev/null
  cli_user machine start "$machine" >/dev/null
  echo "variant $variant: virtiofsd $(tr '\0' ' ' </proc/"$(pgrep -n -u "$user" -x virtiofsd)"/cmdline | cut -d' ' -f2-)" >&2
  first=$([ "$variant" = "${variants[0]}" ] && echo 1 || echo 0)
  if [ "$first" = 1 ]; then
    in_guest sh -ec "rm -rf $gdir; mkdir -p $gdir; tar -C $gdir -xf $dir/repo.tar; cp $dir/src.tar $gdir/"
  fi
  # Untimed, before each round's walk and status: the previous round's `read` dropped the
  # guest's caches (dentries and inodes too), and these two are meant warm.
  warm() {
    case $1 in
      share) in_guest "$dir/work.sh" walk "$dir" "$files" >/dev/null; in_guest "$dir/work.sh" status "$dir" "$files" >/dev/null ;;
      guest) in_guest "$dir/work.sh" walk "$gdir" "$files" >/dev/null; in_guest "$dir/work.sh" status "$gdir" "$files" >/dev/null ;;
      host) as_user "$dir/work.sh" walk "$dir" "$files" >/dev/null; as_user "$dir/work.sh" status "$dir" "$files" >/dev/null ;;
    esac
  }
  for i in $(seq 1 "$rounds"); do
    line="round $i $variant:"
    for loc in share guest host; do
      [ "$first" = 1 ] || [ "$loc" = share ] || continue
      key=$variant.$loc
      [ "$loc" = share ] || key=$loc
      warm "$loc"
      for op in "${ops[@]}"; do
        if [ "$op" = read ]; then
          drop_guest
          case $loc in
            share | host) drop_host_file "$dir/big" ;;
            guest) drop_host_file "$CONTAINER_ROOT/machines/$machine/disk.qcow2" ;;
          esac
        fi
        case $loc in
          share) s=$(in_guest "$dir/work.sh" "$op" "$dir" "$files") ;;
          guest) s=$(in_guest "$dir/work.sh" "$op" "$gdir" "$files") ;;
          host) s=$(as_user "$dir/work.sh" "$op" "$dir" "$files") ;;
        esac
        res[$key.$op]+=" $s"
        line+=" $loc.$op=$s"
      done
      # The 1 GiB file goes before the next location writes its own.
      case $loc in
        share | host) rm -f "$dir/big" ;;
        guest) in_guest rm -f "$gdir/big" ;;
      esac
    done
    echo "$line" >&2
  done
done

mb() { printf '%.0f' "$(echo "1024 / $1" | bc -l)"; }
echo
echo "shared home (virtiofs) vs guest disk vs host, median of $rounds; $files files; $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-34s %9s %9s %9s %11s %11s\n' "variant / op" share guest-disk host share/guest share/host
for variant in "${variants[@]}"; do
  for op in "${ops[@]}"; do
    # shellcheck disable=SC2086 # word splitting of the lists is intended
    s=$(median ${res[$variant.share.$op]}) g=$(median ${res[guest.$op]}) h=$(median ${res[host.$op]})
    unit=s
    case $op in write | read) unit="s (share $(mb "$s") MB/s, disk $(mb "$g"), host $(mb "$h"))" ;; esac
    printf '%-34s %9s %9s %9s %11s %11s  %s\n' "$variant / $op" "$s" "$g" "$h" "$(ratio "$s" "$g")" "$(ratio "$s" "$h")" "$unit"
  done
done
