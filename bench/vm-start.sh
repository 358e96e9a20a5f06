#!/usr/bin/env bash
# Cold start and host memory of a machine: ours against plain QEMU booting the same kernel
# and the same disk on the same host, in the same run.
#
#   bench/vm-start.sh [ROUNDS] [IMAGES]   ROUNDS: 3; IMAGES: tests/images recipes, "busybox debian"
#
# (a) Cold start: a stopped machine until a command has run in it.
#   ours:  `container machine run -n N true` on a stopped machine (CLI → service → helpers
#          (vhost-device-vsock, virtiofsd for the home) → QEMU → kernel → the agent as PID 1
#          loads its modules, mounts the machine disk, mounts the home, switches root, hands
#          over to the image's /sbin/init and answers on vsock → `true` runs from the machine
#          disk → exit status back). Also `container machine start N` alone (returns when the
#          agent answers). The machine has booted once before (first-boot work, the online
#          growth of the filesystem and the user setup, is not counted).
#   raw:   qemu-system-x86_64 -M microvm with the same accelerator, CPU, vCPUs, memory and
#          kernel command line as our QEMU, the same kernel, and the machine's own disk
#          (its qcow2, snapshot=on so nothing is written), and a minimal initramfs (static
#          busybox + virtio_ring, virtio, virtio_mmio, virtio_blk from the same kernel) whose
#          /init loads the modules, mounts /dev/vda and runs `/bin/sh -c 'echo BENCH-READY'`
#          chrooted into it; timed from the QEMU launch to the marker on the serial console.
#          It boots the kernel file as installed (the bzImage); ours boots the kernel the
#          service unpacked from it once (runtime/boot_image.rs), which is part of what we cut.
#   "Same point" on both sides: the machine disk is mounted as root and a process from it has
#   run. On ours the image's init has just been started (a Debian machine's systemd is still
#   booting; the time until `systemctl is-system-running` says running is printed for
#   information, it has no raw counterpart). ours/raw is our overhead.
# (b) Host memory: RSS and PSS of the QEMU process (/proc/PID/smaps_rollup) of an idle VM
#   (2 vCPUs, 2 GiB) after the guest filled a 1 GiB tmpfs and deleted it, once the numbers
#   stop moving. ours: a busybox machine (virtio-balloon with free-page reporting, always on:
#   there is no knob to turn it off). raw: QEMU with the same guest memory backend (shared
#   memfd), the same kernel and the same fill from an initramfs, with and without
#   `-device virtio-balloon-device,free-page-reporting=on`.
#
# Runs in a network namespace of its own with a service of its own (bench/lib.sh).
# CONTAINER: the CLI (default target/install/bin/container, from scripts/build.sh). Needs root.
set -euo pipefail
self=$(realpath "$0")
cd "$(dirname "$self")/.."
# shellcheck source=bench/lib.sh
. bench/lib.sh
bench_enter_netns "$self" "$@"
rounds=${1:-3}
read -r -a images <<<"${2:-busybox debian}"
bench_start

fill='mkdir -p /tmp/bench-fill && mount -t tmpfs -o size=1100m tmpfs /tmp/bench-fill && dd if=/dev/zero of=/tmp/bench-fill/x bs=1048576 count=1024 2>/dev/null && rm /tmp/bench-fill/x && umount /tmp/bench-fill'

# The minimal initramfs of the raw side, from the kernel the service boots.
kernel_json=$("$cli" system status --format json | jq .kernel)
vmlinuz=$(jq -r .path <<<"$kernel_json")
modules=$(jq -r '.modules // ""' <<<"$kernel_json")
[ -n "$modules" ] || bench_die "the kernel has no module tree: the raw initramfs needs virtio_blk"
ir=$work/initramfs
mkdir -p "$ir"/{bin,dev,proc,sys,mnt,lib/modules}
cp "$(command -v busybox)" "$ir/bin/busybox"
file "$ir/bin/busybox" 2>/dev/null | grep -q 'statically linked' \
  || ldd "$ir/bin/busybox" 2>&1 | grep -q 'not a dynamic' \
  || bench_die "busybox is not static: apt-get install busybox-static"
for m in virtio_ring virtio virtio_mmio virtio_blk virtio_balloon; do
  ko=$(find "$modules" -name "$m.ko" | head -n 1)
  [ -n "$ko" ] || bench_die "no $m.ko under $modules (compressed modules are not handled)"
  cp "$ko" "$ir/lib/modules/"
done
cat >"$ir/init" <<FILL
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t devtmpfs dev /dev
exec >/dev/console 2>&1 </dev/console
mount -t proc proc /proc
for m in virtio_ring virtio virtio_mmio virtio_blk; do insmod /lib/modules/\$m.ko; done
if grep -q bench=mem /proc/cmdline; then
  insmod /lib/modules/virtio_balloon.ko
  ${fill//\/tmp\/bench-fill//fill}
  echo "BENCH-FREED \$(cut -d' ' -f1 /proc/uptime)"
  while :; do sleep 3600; done
fi
i=0
while [ ! -b /dev/vda ] && [ \$i -lt 1000 ]; do usleep 10000; i=\$((i + 1)); done
mount -t ext4 /dev/vda /mnt
chroot /mnt /bin/sh -c "echo BENCH-READY \$(cut -d' ' -f1 /proc/uptime)"
poweroff -f
FILL
chmod 755 "$ir/init"
(cd "$ir" && find . | cpio -o -H newc --quiet) >"$work/raw.cpio"

# Our QEMU's options, read from a running machine's command line: q_accel q_cpu q_smp q_m
# q_object q_numa q_append.
qemu_opts() {
  local args i
  mapfile -d '' args <"/proc/$1/cmdline"
  for i in "${!args[@]}"; do
    case ${args[$i]} in
      -accel) q_accel=${args[$((i + 1))]} ;;
      -cpu) q_cpu=${args[$((i + 1))]} ;;
      -smp) q_smp=${args[$((i + 1))]} ;;
      -m) q_m=${args[$((i + 1))]} ;;
      -object) q_object=${args[$((i + 1))]} ;;
      -numa) q_numa=${args[$((i + 1))]} ;;
      -append) q_append=${args[$((i + 1))]} ;;
    esac
  done
}

raw_base() {
  raw=(qemu-system-x86_64 -M "microvm,rtc=on" -nodefaults -no-user-config -display none
    -no-reboot -accel "$q_accel" -cpu "$q_cpu" -smp "$q_smp" -m "$q_m"
    -kernel "$vmlinuz" -initrd "$work/raw.cpio")
}

# Waits for the background process $1 to exit (at most $2 s), else kills it.
reap() {
  local i
  for i in $(seq 1 $((${2:-30} * 10))); do
    kill -0 "$1" 2>/dev/null || break
    sleep 0.1
  done
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
  bench_forget "$1"
}

# One raw cold boot of disk $1: sets raw_wall (s) and raw_guest (guest uptime at the marker).
raw_cold() {
  local fifo=$work/raw.fifo t0 pid line
  raw_base
  rm -f "$fifo"
  mkfifo "$fifo"
  t0=$(now)
  "${raw[@]}" -append "$q_append" -serial stdio \
    -drive "id=root,file=$1,format=qcow2,if=none,snapshot=on,cache=writeback" \
    -device virtio-blk-device,drive=root </dev/null >"$fifo" 2>"$work/raw.err" &
  pid=$!
  bench_pids+=("$pid")
  line=$(timeout 180 grep -a -m1 BENCH-READY <"$fifo") \
    || { cat "$work/raw.err" >&2; bench_die "raw QEMU did not reach the marker"; }
  raw_wall=$(since "$t0")
  raw_guest=$(tr -d '\r' <<<"$line" | awk '{print $2}')
  reap "$pid" 30
}

# The guest time at which our agent handed over to init, from the machine's console log.
ours_guest() {
  tr -d '\r' <"$CONTAINER_ROOT/machines/$1/console.log" \
    | sed -n 's/^container-agent: starting init .*\[\([0-9.]*\)s\]$/\1/p' | tail -n 1
}

# Lets a booted machine reach its idle state (Debian: systemd running) so that it stops
# cleanly; prints the seconds since $2 at which it got there (empty for busybox).
settle() {
  local state i
  "$cli" machine run -n "$1" --root --no-shell sh -c 'command -v systemctl' >/dev/null 2>&1 || return 0
  for i in $(seq 1 120); do
    state=$("$cli" machine run -n "$1" --root systemctl is-system-running 2>/dev/null || true)
    case $state in
      running | degraded)
        since "$2"
        return 0
        ;;
    esac
    sleep 0.5
  done
  echo "bench: $1: systemd not running after 60 s (last state: $state)" >&2
}

declare -A res
for image in "${images[@]}"; do
  name=bench-$image
  ref=$(bench_push "$image")
  "$cli" image pull -q "$ref"
  "$cli" machine create "$ref" --name "$name" --no-boot --cpus 2 --memory 1G >/dev/null
  # First boot (filesystem growth, user setup) is not counted; it gives our QEMU options.
  "$cli" machine run -n "$name" true
  qemu_opts "$(bench_qemu_pid "$name")"
  settle "$name" "$(now)" >/dev/null
  "$cli" machine stop "$name" >/dev/null
  disk=$CONTAINER_ROOT/machines/$name/disk.qcow2
  runs=() starts=() raws=() g_ours=() g_raw=() readys=()
  for i in $(seq 1 "$rounds"); do
    sync
    t0=$(now)
    "$cli" machine run -n "$name" true
    runs+=("$(since "$t0")")
    g_ours+=("$(ours_guest "$name")")
    r=$(settle "$name" "$t0")
    [ -z "$r" ] || readys+=("$r")
    "$cli" machine stop "$name" >/dev/null
    sync
    t0=$(now)
    "$cli" machine start "$name" >/dev/null
    starts+=("$(since "$t0")")
    settle "$name" "$t0" >/dev/null
    "$cli" machine stop "$name" >/dev/null
    sync
    raw_cold "$disk"
    raws+=("$raw_wall")
    g_raw+=("$raw_guest")
    echo "$image round $i: ours run ${runs[-1]} s, ours start ${starts[-1]} s, raw ${raws[-1]} s (guest: ours init at ${g_ours[-1]} s, raw marker at ${g_raw[-1]} s)${r:+, systemd running at $r s}" >&2
  done
  bench_rm "$name"
  res[$image.run]=$(median "${runs[@]}")
  res[$image.start]=$(median "${starts[@]}")
  res[$image.raw]=$(median "${raws[@]}")
  res[$image.all]="ours run [${runs[*]}], start [${starts[*]}], raw [${raws[*]}]"
  res[$image.guest]="guest seconds to the command: ours $(median "${g_ours[@]}") (agent hands over to init), raw $(median "${g_raw[@]}")"
  res[$image.ready]=${readys[*]:+$(median "${readys[@]}")}
done

# (b) memory
mem_fmt() { awk '{printf "RSS %5.0f MiB  PSS %5.0f MiB", $1 / 1024, $2 / 1024}' <<<"$1"; }
ref=$(bench_push busybox)
"$cli" image pull -q "$ref"
"$cli" machine create "$ref" --name bench-mem --no-boot --cpus 2 --memory 2G >/dev/null
"$cli" machine run -n bench-mem true
pid=$(bench_qemu_pid bench-mem)
qemu_opts "$pid"
mem_ours_idle=$(bench_settled_mem "$pid")
"$cli" machine run -n bench-mem --root --no-shell sh -c "$fill"
mem_ours=$(bench_settled_mem "$pid")
echo "memory: ours idle $(mem_fmt "$mem_ours_idle"), after fill+free $(mem_fmt "$mem_ours")" >&2
bench_rm bench-mem

# A raw VM that fills and frees 1 GiB at boot, then idles; extra QEMU arguments in "$@".
raw_mem() {
  local log=$work/raw-mem.log i pid
  raw_base
  : >"$log"
  "${raw[@]}" -object "$q_object" -numa "$q_numa" -append "$q_append bench=mem" \
    -serial "file:$log" "$@" </dev/null >/dev/null 2>"$work/raw.err" &
  pid=$!
  bench_pids+=("$pid")
  for i in $(seq 1 1800); do
    grep -aq BENCH-FREED "$log" && break
    kill -0 "$pid" 2>/dev/null || { cat "$work/raw.err" "$log" >&2; bench_die "raw QEMU exited"; }
    sleep 0.1
  done
  grep -aq BENCH-FREED "$log" || bench_die "raw QEMU: no fill marker after 180 s"
  raw_mem_result=$(bench_settled_mem "$pid")
  kill "$pid"
  reap "$pid" 10
}
raw_mem
mem_raw_none=$raw_mem_result
echo "memory: raw without balloon $(mem_fmt "$mem_raw_none")" >&2
raw_mem -device virtio-balloon-device,free-page-reporting=on
mem_raw_fpr=$raw_mem_result
echo "memory: raw with free-page reporting $(mem_fmt "$mem_raw_fpr")" >&2

echo
echo "cold start until a command ran (median of $rounds, seconds; $(nproc) cores, ${q_accel%%,*}):"
printf '%-8s %10s %11s %9s %9s\n' image "ours run" "ours start" "raw qemu" "ours/raw"
for image in "${images[@]}"; do
  printf '%-8s %10.2f %11.2f %9.2f %9s\n' "$image" "${res[$image.run]}" "${res[$image.start]}" \
    "${res[$image.raw]}" "$(ratio "${res[$image.run]}" "${res[$image.raw]}")"
done
for image in "${images[@]}"; do
  echo "  $image: ${res[$image.all]}"
  echo "  $image: ${res[$image.guest]}"
  if [ -n "${res[$image.ready]}" ]; then
    echo "  $image: systemd running (ours, for information): ${res[$image.ready]} s after the command"
  fi
done
echo
echo "host memory of the QEMU process, idle, after the guest filled and freed 1 GiB (2 GiB VM):"
echo "  ours (balloon, free-page reporting):  $(mem_fmt "$mem_ours")   (idle before the fill: $(mem_fmt "$mem_ours_idle"))"
echo "  raw qemu, no balloon:                 $(mem_fmt "$mem_raw_none")"
echo "  raw qemu, free-page reporting:        $(mem_fmt "$mem_raw_fpr")"
rss() { cut -d' ' -f1 <<<"$1"; }
echo "  ratio RSS ours/raw-no-balloon: $(ratio "$(rss "$mem_ours")" "$(rss "$mem_raw_none")"), raw-reporting/raw-no-balloon: $(ratio "$(rss "$mem_raw_fpr")" "$(rss "$mem_raw_none")")"
