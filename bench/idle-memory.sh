#!/usr/bin/env bash
# What an idle Debian systemd machine holds on the host, against what its guest uses, and what
# TCG's translation cache size does to it and to the boot, in one run.
#
#   bench/idle-memory.sh [VARIANTS] [MEMORY]
#     VARIANTS: "1G:off 128M:off 128M:30s 64M:30s"; MEMORY: 1536M
#
# Each variant is TB:RECLAIM: the translation-cache size (`[runtime] tcg-translation-cache`;
# `default` leaves the service's, 128M; 1G is QEMU's own) and when an idle machine gives its page cache back (`[memory]
# reclaim-idle-after`, `off` or a duration). With a service restarted on that config: a Debian test machine with MEMORY is
# created without booting, then `container machine run -n N true` boots it; timed until
# systemd says `running` (or `degraded`) inside. 60 s after that, one
# `container machine stats --no-stream --format json` sample: the host's PSS and RSS of QEMU
# and each helper, and the guest's used memory and cache (its /proc/meminfo).
#
# Goal (issue 15): host PSS <= guest used + 64 MiB under KVM, <= 1.5 x that under TCG. The
# ratio column is host PSS / (guest used + 64 MiB). Under TCG QEMU also holds the code it
# translated, which the cache size bounds.
#
# Runs in a network namespace of its own with a service of its own (bench/lib.sh). Needs root.
set -euo pipefail
self=$(realpath "$0")
cd "$(dirname "$self")/.."
# shellcheck source=bench/lib.sh
. bench/lib.sh
bench_enter_netns "$self" "$@"
read -r -a variants <<<"${1:-default:off 128M:off 64M:off 64M:30s}"
memory=${2:-1536M}
bench_start
ref=$(bench_push debian)
conf=$XDG_CONFIG_HOME/container/config.toml
mkdir -p "$(dirname "$conf")"
MIB=1048576

# QEMU's PSS by what holds it (/proc/PID/smaps): the guest's RAM (the memfd backend), the
# translation cache (TCG's code buffer: the anonymous mapping that is writable and
# executable), QEMU's other anonymous memory (heap, TLBs, stacks), and files (QEMU's binary
# and libraries).
qemu_breakdown() {
  awk -v m=$MIB '
    /^[0-9a-f]+-[0-9a-f]+ / { kind = "files"; if ($6 ~ /memfd:mem/) kind = "ram";
      else if ($6 == "" || $6 ~ /^\[/) kind = ($2 ~ /w/ && $2 ~ /x/) ? "tcg" : "anon" }
    /^Pss:/ { sum[kind] += $2 }
    END { printf "QEMU ram=%d tcg=%d anon=%d files=%d MiB", sum["ram"] / 1024, sum["tcg"] / 1024,
      sum["anon"] / 1024, sum["files"] / 1024 }' "/proc/$1/smaps"
}

# The guest's side, from its /proc/meminfo: what its kernel took before counting (the VM's
# memory less MemTotal), and what it holds that is neither free nor cache (slab, page tables).
guest_breakdown() {
  "$cli" machine run -n "$1" --root cat /proc/meminfo | awk -v vm=$(($(numfmt --from=iec "$memory") / 1024)) '
    { v[$1] = $2 }
    END { printf "reserved=%d slab=%d pagetables=%d free=%d MiB", (vm - v["MemTotal:"]) / 1024,
      (v["Slab:"]) / 1024, v["PageTables:"] / 1024, v["MemFree:"] / 1024 }'
}

breakdown=()
printf '%-12s %8s %9s %9s %11s %11s %6s  %s\n' "tb:reclaim" "boot s" "host PSS" "host RSS" "guest used" "guest cache" "ratio" "PSS per process (MiB)"
for variant in "${variants[@]}"; do
  size=${variant%%:*}
  reclaim=${variant#*:}
  printf '[memory]\nreclaim-idle-after = "%s"\nreclaim-pressure = 0\n' "$reclaim" >"$conf"
  if [ "$size" != default ]; then
    printf '[runtime]\ntcg-translation-cache = "%s"\n' "$size" >>"$conf"
  fi
  "$cli" system stop >/dev/null
  "$cli" system start >/dev/null
  name=idle-${size,,}-${reclaim,,}
  "$cli" machine create "$ref" --name "$name" --memory "$memory" --no-boot --home-mount none >/dev/null
  start=$(now)
  "$cli" machine run -n "$name" true
  state=
  for _ in $(seq 600); do
    state=$("$cli" machine run -n "$name" --root systemctl is-system-running 2>/dev/null || true)
    case $state in running | degraded) break ;; esac
    sleep 0.2
  done
  boot=$(since "$start")
  [ "$state" = running ] || [ "$state" = degraded ] || bench_die "$name: systemd says '$state'"
  sleep 60
  s=$("$cli" machine stats --no-stream --format json "$name" | jq '.[0]')
  pss=$(jq '.hostMemory.pss' <<<"$s")
  rss=$(jq '.hostMemory.rss' <<<"$s")
  used=$(jq '.guestMemory.used' <<<"$s")
  cache=$(jq '.guestMemory.cache' <<<"$s")
  per=$(jq -r --argjson m $MIB '[.hostMemory.processes[] | "\(.name)=\(.pss / $m | floor)"] | join(" ")' <<<"$s")
  printf '%-12s %8s %9d %9d %11d %11d %6s  %s\n' "$variant" "$boot" $((pss / MIB)) $((rss / MIB)) \
    $((used / MIB)) $((cache / MIB)) "$(ratio "$pss" $((used + 64 * MIB)))" "$per"
  qemu=$(jq -r '[.hostMemory.processes[] | select(.name | test("qemu"))][0].pid' <<<"$s")
  breakdown+=("$variant: $(qemu_breakdown "$qemu") | guest: $(guest_breakdown "$name")")
  bench_rm "$name"
done
echo
echo "where it is (60 s after boot):"
printf '  %s\n' "${breakdown[@]}"
