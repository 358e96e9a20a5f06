#!/usr/bin/env bash
# Warm exec latency: `container machine run -n N true` on a running machine against `ssh` into
# the same VM, in the same run.
#
#   bench/exec.sh [RUNS]   RUNS: 20 per command (after 3 warm-up runs)
#
# Machines (2 vCPUs, 1 GiB): a busybox one (the fastest init) and one from the sshd test image
# (Debian + openssh-server, tests/images/recipes/sshd.sh; --home-mount none, so the key this
# benchmark installs goes to the machine's /root and never to the host's), each booted and
# idle (Debian: systemd running, ssh.service active) before it is measured.
#   ours:  `container machine run -n N true`: CLI → HTTP upgrade on the service's socket →
#          agent session over vsock → fork/exec `true` in the guest → exit status back.
#   ssh:   `ssh root@IP true` with a key, a new connection each time (TCP, key exchange and
#          authentication in the emulated guest); and over a multiplexed master connection
#          (ControlMaster), which leaves only the session's own round trips.
# Both ends run in this benchmark's network namespace (bench/lib.sh): the machine's address
# is reached only there. When the machine has no address (`ipAddress` absent in
# `container machine ls --format json`), the ssh half says so and is skipped.
# Measured with hyperfine (-N, no shell) when installed, else a loop (median of RUNS).
# CONTAINER: the CLI (default target/install/bin/container, from scripts/build.sh). Needs root.
set -euo pipefail
self=$(realpath "$0")
cd "$(dirname "$self")/.."
# shellcheck source=bench/lib.sh
. bench/lib.sh
bench_enter_netns "$self" "$@"
runs=${1:-20}
bench_start

# measure LABEL CMD...: median and mean in ms into res[LABEL], a line on stderr.
declare -A res
measure() {
  local label=$1 json=$work/hf.json t0 times=() i m mean sd min max
  shift
  if command -v hyperfine >/dev/null; then
    hyperfine -N --style none --warmup 3 --runs "$runs" --export-json "$json" "$*" >/dev/null 2>&1 \
      || { "$@" || true; bench_die "$label: the command fails: $*"; }
    res[$label]=$(jq -r '.results[0] | "\(.median * 1000) \(.mean * 1000) \(.stddev * 1000) \(.min * 1000) \(.max * 1000)"' "$json")
  else
    for i in 1 2 3; do "$@" >/dev/null; done
    for i in $(seq 1 "$runs"); do
      t0=$(now)
      "$@" >/dev/null
      times+=("$(echo "($(now) - $t0) * 1000" | bc)")
    done
    res[$label]="$(median "${times[@]}") - - - -"
  fi
  read -r m mean sd min max <<<"${res[$label]}"
  printf '%-34s median %7.1f ms  (mean %s, sd %s, min %s, max %s)\n' "$label" "$m" \
    "$(printf '%.1f' "$mean" 2>/dev/null || echo -)" "$(printf '%.1f' "$sd" 2>/dev/null || echo -)" \
    "$(printf '%.1f' "$min" 2>/dev/null || echo -)" "$(printf '%.1f' "$max" 2>/dev/null || echo -)" >&2
}

# Waits (at most $3 s) until `run -n $1 --root $2` prints one of the words in $4.
wait_state() {
  local i out
  for i in $(seq 1 "$3"); do
    out=$("$cli" machine run -n "$1" --root --no-shell sh -c "$2" 2>/dev/null || true)
    case " $4 " in *" $out "*) return 0 ;; esac
    sleep 1
  done
  bench_die "$1: '$2' still says '$out' after $3 s"
}

# busybox
ref=$(bench_push busybox)
"$cli" image pull -q "$ref"
"$cli" machine create "$ref" --name bench-exec-bb --cpus 2 --memory 1G >/dev/null
"$cli" machine run -n bench-exec-bb true
sleep 2
measure "busybox: container machine run" "$cli" machine run -n bench-exec-bb true
bench_rm bench-exec-bb

# sshd
ref=$(bench_push sshd)
"$cli" image pull -q "$ref"
"$cli" machine create "$ref" --name bench-exec-ssh --cpus 2 --memory 1G --home-mount none >/dev/null
"$cli" machine run -n bench-exec-ssh true
wait_state bench-exec-ssh 'systemctl is-system-running' 180 "running degraded"
wait_state bench-exec-ssh 'systemctl is-active ssh.service' 120 active
measure "sshd: container machine run" "$cli" machine run -n bench-exec-ssh true

ssh_skip=
ip=$("$cli" machine ls --format json | jq -r '.[] | select(.id == "bench-exec-ssh") | .ipAddress // empty')
ip=${ip%%/*}
if [ -z "$ip" ]; then
  ssh_skip="skipped: machine has no address (ipAddress is absent from \`container machine ls --format json\`)"
else
  ssh-keygen -q -t ed25519 -N '' -f "$work/key"
  "$cli" machine run -n bench-exec-ssh --root -i --no-shell sh -c \
    'umask 077 && mkdir -p /root/.ssh && cat > /root/.ssh/authorized_keys' <"$work/key.pub"
  ssh_opts=(-F none -i "$work/key" -o BatchMode=yes -o StrictHostKeyChecking=no
    -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o ConnectTimeout=10)
  for i in $(seq 1 30); do
    timeout 2 ssh "${ssh_opts[@]}" "root@$ip" true 2>/dev/null && break
    [ "$i" = 30 ] && bench_die "ssh root@$ip does not answer (machine $ip, from this namespace)"
    sleep 1
  done
  measure "sshd: ssh (new connection)" ssh "${ssh_opts[@]}" "root@$ip" true
  ctl=$work/ssh.ctl
  ssh "${ssh_opts[@]}" -o ControlMaster=yes -o ControlPath="$ctl" -o ControlPersist=no -N -f "root@$ip"
  master=$(ssh -o ControlPath="$ctl" -O check "root@$ip" 2>&1 | sed -n 's/.*pid=\([0-9]*\).*/\1/p')
  [ -z "$master" ] || bench_pids+=("$master")
  measure "sshd: ssh (multiplexed)" ssh "${ssh_opts[@]}" -o ControlPath="$ctl" "root@$ip" true
  ssh -o ControlPath="$ctl" -O exit "root@$ip" 2>/dev/null || true
fi
bench_rm bench-exec-ssh

med() { cut -d' ' -f1 <<<"${res[$1]}"; }
echo
echo "warm exec of \`true\` on a running machine (median of $runs, ms; $(nproc) cores, TCG guest):"
printf '  %-32s %8.1f\n' "ours, busybox machine" "$(med "busybox: container machine run")"
printf '  %-32s %8.1f\n' "ours, sshd (Debian) machine" "$(med "sshd: container machine run")"
if [ -n "$ssh_skip" ]; then
  echo "  ssh: $ssh_skip"
else
  ours=$(med "sshd: container machine run")
  printf '  %-32s %8.1f   ours/ssh %s\n' "ssh, new connection" "$(med "sshd: ssh (new connection)")" \
    "$(ratio "$ours" "$(med "sshd: ssh (new connection)")")"
  printf '  %-32s %8.1f   ours/ssh %s\n' "ssh, multiplexed connection" "$(med "sshd: ssh (multiplexed)")" \
    "$(ratio "$ours" "$(med "sshd: ssh (multiplexed)")")"
fi
