#!/usr/bin/env bash
# Where the time goes from `container machine run -n N true` on a stopped Debian systemd machine
# to systemd `running` inside, in one run per round:
#
#   bench/boot-breakdown.sh [ROUNDS] [IMAGE]   ROUNDS: 3; IMAGE: debian (tests/images recipe)
#
#   total     host clock: the `run true` is issued .. `systemctl is-system-running` first says
#             running (or degraded), polled every 0.2 s
#   vmm       total - the guest's own uptime when systemd finished (`systemd-analyze`): the
#             service's work before QEMU (initramfs, helpers), QEMU's start and the firmware
#   kernel    guest uptime at the agent's first line (the kernel's own boot)
#   agent     the agent's steps, from its first line to handing over to init, each one from
#             its `[uptime]` stamps in `container machine logs --boot`: modules, disk mount,
#             filesystem growth, shares, network, switch root, user setup
#   init      systemd's userspace time (`systemd-analyze`): init start .. default target
#   ours      vmm + agent, and its share of total (goal: under 15%)
#
# The machine booted once before the first round (first-boot work, the filesystem growth and
# the user setup, is then done). Runs in a network namespace of its own with a service of its
# own (bench/lib.sh). Needs root; release binaries (PROFILE=release scripts/build.sh).
set -euo pipefail
self=$(realpath "$0")
cd "$(dirname "$self")/.."
# shellcheck source=bench/lib.sh
. bench/lib.sh
bench_enter_netns "$self" "$@"
rounds=${1:-3}
image=${2:-debian}
bench_start
ref=$(bench_push "$image")
name=boot
"$cli" machine create "$ref" --name "$name" --memory 1G --home-mount rw >/dev/null

# Seconds of systemd-analyze's "Startup finished in A (kernel) + B (userspace) = C" part $1.
analyze_part() {
  local text=$1 part=$2
  sed -n "s/.* \([0-9.]*m\{0,1\}s\) ($part).*/\1/p" <<<"$text" | head -n 1 |
    awk '{v=$1; if (v ~ /ms$/) {sub(/ms$/, "", v); v=v/1000} else {sub(/s$/, "", v)}; printf "%.3f", v}'
}

printf '%-6s %7s %7s %7s %7s %7s %7s %7s  %s\n' round total vmm kernel agent init ours share "agent steps (s)"
for r in $(seq "$rounds"); do
  "$cli" machine stop "$name" >/dev/null
  start=$(now)
  "$cli" machine run -n "$name" true
  state=
  for _ in $(seq 600); do
    state=$("$cli" machine run -n "$name" --root systemctl is-system-running 2>/dev/null || true)
    case $state in running | degraded) break ;; esac
    sleep 0.2
  done
  total=$(since "$start")
  analyze=$("$cli" machine run -n "$name" --root systemd-analyze 2>/dev/null || true)
  guest_kernel=$(analyze_part "$analyze" kernel)
  init=$(analyze_part "$analyze" userspace)
  if [ -z "$guest_kernel" ] || [ -z "$init" ]; then
    bench_die "no systemd-analyze figures: $analyze"
  fi
  boot_log=$("$cli" machine logs --boot "$name")
  stamps=$(grep -o 'container-agent: .*\[[0-9.]*s\]' <<<"$boot_log" | sed 's/container-agent: \(.*\) \[\([0-9.]*\)s\]/\2 \1/')
  first=$(head -n 1 <<<"$stamps" | cut -d' ' -f1)
  last=$(tail -n 1 <<<"$stamps" | cut -d' ' -f1)
  agent=$(echo "$last - $first" | bc)
  vmm=$(echo "$total - $guest_kernel - $init" | bc)
  ours=$(echo "$vmm + $agent" | bc)
  steps=$(awk -v f="$first" 'NR > 1 {printf "%s%.2f %s", sep, $1 - prev, $2; sep="; "} {prev=$1}' <<<"$stamps")
  printf '%-6s %7.2f %7.2f %7.2f %7.2f %7.2f %7.2f %6.0f%%  %s\n' "$r" "$total" "$vmm" "$first" "$agent" "$init" \
    "$ours" "$(echo "$ours * 100 / $total" | bc -l)" "$steps"
done
