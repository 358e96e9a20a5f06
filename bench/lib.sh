# shellcheck shell=bash
# Shared by the VM benchmarks (vm-start.sh, exec.sh, machine-create.sh); sourced, not run.
#
# Each benchmark runs in a network namespace of its own (the project's network rule: a
# machine's bridge, tap and address, and all traffic to it, stay inside a namespace the
# benchmark made) with everything it needs started inside: a service of its own in a
# temporary root (CONTAINER_ROOT, CONTAINER_RUN_DIR, CONTAINER_SOCKET, an empty
# XDG_CONFIG_HOME so no user config leaks in) and a local registry on the namespace's
# loopback. The namespace is anonymous (unshare --net): it disappears with the last process
# in it, and the EXIT trap ends all of them (machines, service, registry, raw QEMUs).
#
# Use:  self=$(realpath "$0"); cd "$(dirname "$self")/.."; . bench/lib.sh
#       bench_enter_netns "$self" "$@"   # re-executes the script inside a new namespace
#       bench_start                      # work dir, trap, service, kernel
#       ref=$(bench_push busybox)        # builds (cached) and pushes a test image
# Needs root.

cli=${CONTAINER:-$PWD/target/install/bin/container}
cache=${CONTAINER_TEST_CACHE:-$HOME/.cache/container-test-images}
work=
bench_pids=()

bench_die() {
  echo "bench: $*" >&2
  exit 1
}

now() { date +%s.%N; }

# Seconds since $1 (a `now` value), three decimals.
since() { printf '%.3f' "$(echo "$(now) - $1" | bc)"; }

median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# $1 / $2 with two decimals.
ratio() { printf '%.2f' "$(echo "scale=4; $1 / $2" | bc)"; }

# A kernel for the service, found before entering the namespace (which has no network):
# the one the tests share ($cache/kernel-root), installed there first when missing the way
# a user installs one, `container system kernel set --recommended`, by a service of that
# root started for it alone (it boots no machine), under the lock the tests take.
# Prints "VMLINUZ MODULES_DIR".
bench_find_kernel() {
  local root=$cache/kernel-root info run service status=0
  info=$root/kernels/current.json
  mkdir -p "$root"
  exec 9>"$cache/kernel-root.lock"
  flock 9
  if ! { [ -f "$info" ] && [ -f "$(jq -r .path "$info")" ]; }; then
    run=$(mktemp -d /tmp/container-bench-kernel.XXXXXX)
    mkdir -p "$run/config"
    service=(env CONTAINER_ROOT="$root" CONTAINER_RUN_DIR="$run/run"
      CONTAINER_SOCKET="$run/run/api.sock" XDG_CONFIG_HOME="$run/config" "$cli")
    "${service[@]}" system start >/dev/null || status=$?
    [ "$status" != 0 ] || "${service[@]}" system kernel set --recommended >&2 || status=$?
    "${service[@]}" system stop >/dev/null 2>&1
    rm -rf "$run"
  fi
  exec 9>&-
  [ "$status" = 0 ] || bench_die "cannot install a kernel into $root"
  echo "$(jq -r .path "$info") $(jq -r '.modules // ""' "$info")"
}

# Re-executes the script ($1, then its arguments) in a new network namespace (once);
# inside, brings loopback up.
bench_enter_netns() {
  local self=$1
  shift
  [ "$(id -u)" = 0 ] || bench_die "run as root (the service, QEMU and the image builds need it)"
  [ -x "$cli" ] || bench_die "no container CLI at $cli: build it with scripts/build.sh or set CONTAINER=PATH"
  local tool
  for tool in qemu-system-x86_64 qemu-img docker-registry skopeo jq bc unshare ip busybox cpio; do
    command -v "$tool" >/dev/null || bench_die "$tool is missing: scripts/install-deps.sh"
  done
  # BENCH_OUTER_NETNS: the namespace the script was started in (set when re-executing).
  local here
  here=$(readlink /proc/self/ns/net)
  if [ "${BENCH_OUTER_NETNS:-$here}" = "$here" ]; then
    local kernel
    kernel=$(bench_find_kernel)
    exec unshare --net env BENCH_OUTER_NETNS="$here" BENCH_KERNEL="$kernel" "$self" "$@"
  fi
  ip link set lo up
}

# Drops pid $1 from bench_pids (it has been reaped).
bench_forget() {
  local p keep=()
  for p in "${bench_pids[@]}"; do
    [ "$p" = "$1" ] || keep+=("$p")
  done
  bench_pids=("${keep[@]}")
}

bench_cleanup() {
  set +e
  local pid m f
  for pid in "${bench_pids[@]}"; do
    kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  done
  if [ -S "${CONTAINER_SOCKET:-}" ] && "$cli" system status >/dev/null 2>&1; then
    for m in $("$cli" machine ls -q 2>/dev/null); do
      "$cli" machine rm -f "$m" >/dev/null 2>&1
    done
    "$cli" system stop >/dev/null 2>&1
  fi
  # Whatever the service left running (it is stopped or dead): the pids it recorded.
  for f in "$work"/root/machines/*/run.json; do
    [ -f "$f" ] || continue
    for pid in $(jq -r '.qemu[0], .helpers[][0]' "$f" 2>/dev/null); do
      kill "$pid" 2>/dev/null
    done
  done
  scripts/test-registry.sh stop "$work/registry" >/dev/null 2>&1
  rm -rf --one-file-system "$work"
}

# The work directory, the trap, the service of its own and its kernel.
bench_start() {
  work=$(mktemp -d /tmp/container-bench.XXXXXX)
  trap bench_cleanup EXIT
  trap 'exit 130' INT TERM
  export CONTAINER_ROOT=$work/root CONTAINER_RUN_DIR=$work/run
  export CONTAINER_SOCKET=$work/run/api.sock XDG_CONFIG_HOME=$work/config
  mkdir -p "$XDG_CONFIG_HOME" "$work/registry"
  "$cli" system start >/dev/null
  local vmlinuz modules
  read -r vmlinuz modules <<<"${BENCH_KERNEL:?bench_enter_netns first}"
  if [ -n "$modules" ]; then
    "$cli" system kernel set --binary "$vmlinuz" --modules "$modules" >/dev/null
  else
    "$cli" system kernel set --binary "$vmlinuz" >/dev/null
  fi
  echo "host: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg), $("$cli" system status --format json | jq -r .virtualization)" >&2
}

# Builds (cached) the test image $1, pushes it to the benchmark's registry (started on first
# use) and prints its reference.
bench_push() {
  local layout
  layout=$(tests/images/build.sh "$1" | tail -n 1)
  if [ ! -f "$work/registry/addr" ]; then
    scripts/test-registry.sh start "$work/registry" >/dev/null
  fi
  scripts/test-registry.sh push "$work/registry" "$layout" "bench/$1:latest" >/dev/null
  echo "$(cat "$work/registry/addr")/bench/$1:latest"
}

# Removes machine $1 (stopping it first), quietly unless it fails.
bench_rm() {
  "$cli" machine rm -f "$1" >/dev/null 2>"$work/rm.err" || {
    cat "$work/rm.err" >&2
    return 1
  }
}

# The pid of a running machine's QEMU.
bench_qemu_pid() {
  jq -r '.qemu[0]' "$CONTAINER_ROOT/machines/$1/run.json"
}

# "RSS PSS" in KiB of a process, from /proc/PID/smaps_rollup.
bench_mem() {
  awk '/^Rss:/ {r=$2} /^Pss:/ {p=$2} END {print r, p}' "/proc/$1/smaps_rollup"
}

# Waits until a process's RSS stops changing (three samples 2 s apart within 1%, at most
# $2 seconds, default 90) and prints "RSS PSS" in KiB.
bench_settled_mem() {
  local pid=$1 limit=${2:-90} start prev cur stable=0
  start=$(now)
  prev=$(bench_mem "$pid" | cut -d' ' -f1)
  while [ "$(echo "$(now) - $start < $limit" | bc)" = 1 ]; do
    sleep 2
    cur=$(bench_mem "$pid" | cut -d' ' -f1)
    if [ "$(echo "d = $cur - $prev; if (d < 0) d = -d; d * 100 <= $prev" | bc)" = 1 ]; then
      stable=$((stable + 1))
      [ $stable -ge 2 ] && break
    else
      stable=0
    fi
    prev=$cur
  done
  bench_mem "$pid"
}
