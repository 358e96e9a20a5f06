#!/usr/bin/env bash
# A server in a machine reached through the automatic port forward (the host's 127.0.0.1,
# over vsock) against the same server reached directly at the machine's address (the
# bridge and its tap): latency of many small requests, each on a new connection (`ab -c 1`;
# busybox httpd closes every connection, so each forwarded request is also a new vsock
# session) and throughput of one large file (`curl`), each as a ratio forward / direct.
#
#   bench/port-forward.sh [REQUESTS] [FILE_MIB] [ROUNDS]   (500, 64, 3)
#
# One busybox machine serves a small page and a FILE_MIB file with `httpd -p 8080`. Each
# round runs `ab -n REQUESTS -c 1` and a `curl` download against both addresses; the
# medians are reported. Runs in a network namespace of its own with a service of its own
# (bench/lib.sh). CONTAINER: the CLI (default target/install/bin/container, from
# scripts/build.sh). Needs root, ab (apache2-utils) and curl.
set -euo pipefail
self=$(realpath "$0")
cd "$(dirname "$self")/.."
# shellcheck source=bench/lib.sh
. bench/lib.sh
for tool in ab curl; do
  command -v "$tool" >/dev/null || bench_die "$tool is missing (apt-get install apache2-utils curl)"
done
bench_enter_netns "$self" "$@"
requests=${1:-500}
mib=${2:-64}
rounds=${3:-3}
bench_start

ref=$(bench_push busybox)
"$cli" machine create "$ref" --name bench-web --cpus 1 --memory 512M --home-mount none >/dev/null
ip=$("$cli" machine inspect bench-web --format json | jq -r '.[0].ipAddress // .ipAddress')
if [ -z "$ip" ] || [ "$ip" = null ]; then
  bench_die "the machine has no address"
fi
"$cli" machine run -n bench-web --root \
  "mkdir -p /srv/www && echo hello > /srv/www/index.html && dd if=/dev/zero of=/srv/www/big bs=1M count=$mib 2>/dev/null && httpd -p 8080 -h /srv/www"
forward=127.0.0.1:8080
direct=$ip:8080
deadline=$(($(date +%s) + 30))
until curl -fsS --max-time 2 "http://$forward/index.html" >/dev/null 2>&1; do
  [ "$(date +%s)" -lt "$deadline" ] || bench_die "the forward to 8080 did not come up: $("$cli" machine ports bench-web)"
  sleep 0.2
done
"$cli" machine ports bench-web >&2

# Mean ms per request of `ab -c 1` against $1.
latency() {
  ab -q -n "$requests" -c 1 "http://$1/index.html" 2>/dev/null |
    awk '/^Time per request:/ {print $4; exit}'
}

# MB/s of one download of the large file from $1.
throughput() {
  curl -fsS -o /dev/null -w '%{speed_download}' "http://$1/big" |
    awk '{printf "%.1f", $1 / 1000000}'
}

declare -A lat tput
for side in forward direct; do
  lat[$side]='' tput[$side]=''
done
for i in $(seq 1 "$rounds"); do
  for side in forward direct; do
    addr=${!side}
    l=$(latency "$addr")
    t=$(throughput "$addr")
    lat[$side]+=" $l" tput[$side]+=" $t"
    echo "round $i $side ($addr): $l ms per request, $t MB/s" >&2
  done
done

# shellcheck disable=SC2086 # the lists are words on purpose
{
  lf=$(median ${lat[forward]}) ld=$(median ${lat[direct]})
  tf=$(median ${tput[forward]}) td=$(median ${tput[direct]})
}
echo
echo "port forward vs direct to the machine (busybox httpd, median of $rounds; $(nproc) cores):"
printf '  %-28s %10s %10s %8s\n' "" forward direct ratio
printf '  %-28s %10s %10s %8s\n' "latency, ms per request" "$lf" "$ld" "$(ratio "$lf" "$ld")"
printf '  %-28s %10s %10s %8s\n' "throughput, MB/s ($mib MiB)" "$tf" "$td" "$(ratio "$tf" "$td")"
