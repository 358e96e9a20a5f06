#!/usr/bin/env bash
# A server in a machine reached through the automatic port forward (the host's 127.0.0.1,
# over vsock) against the same server reached directly at the machine's address (the
# bridge and its tap): latency of many small requests, each on a new connection (`ab -c 1`;
# busybox httpd closes every connection, so each forwarded request is also a new vsock
# session), throughput of one large file down (`curl`) and of as much up (to `nc -e wc -c`
# in the guest, the end of the upload sent as a half-close and timed until the guest's
# count comes back), each as a ratio forward / direct.
#
#   bench/port-forward.sh [REQUESTS] [FILE_MIB] [ROUNDS]   (500, 64, 3)
#
# One busybox machine serves a small page and a FILE_MIB file with `httpd -p 8080`. Each
# round runs `ab -n REQUESTS -c 1` and a `curl` download against both addresses; the
# medians are reported. Runs in a network namespace of its own with a service of its own
# (bench/lib.sh). CONTAINER: the CLI (default target/install/bin/container, from
# scripts/build.sh). Needs root, ab (apache2-utils), curl and python3.
set -euo pipefail
self=$(realpath "$0")
cd "$(dirname "$self")/.."
# shellcheck source=bench/lib.sh
. bench/lib.sh
for tool in ab curl python3; do
  command -v "$tool" >/dev/null || bench_die "$tool is missing (apt-get install apache2-utils curl python3)"
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
# The upload's sink: counts what it read to the end of its input, then answers.
"$cli" machine run -n bench-web --root \
  "setsid nc -ll -p 8085 -e wc -c </dev/null >/dev/null 2>&1 &"
until "$cli" machine ports bench-web | grep -q '^8085/tcp .*forwarded'; do
  [ "$(date +%s)" -lt "$deadline" ] || bench_die "the forward to 8085 did not come up: $("$cli" machine ports bench-web)"
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

# MB/s of one upload of the same size to port 8085 of $1 (the host part of an address),
# its end sent as a half-close; timed until the guest's count comes back, which must be all.
upload() {
  python3 - "$1" 8085 "$mib" <<'PY'
import socket, sys, time
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) << 20
chunk = bytes(1 << 16)
s = socket.create_connection((host, port))
start = time.monotonic()
for _ in range(size // len(chunk)):
    s.sendall(chunk)
s.shutdown(socket.SHUT_WR)
reply = b""
while True:
    b = s.recv(4096)
    if not b:
        break
    reply += b
took = time.monotonic() - start
if reply.strip() != str(size).encode():
    sys.exit(f"the guest counted {reply!r}, not {size}")
print(f"{size / took / 1e6:.1f}")
PY
}

declare -A lat tput up
for side in forward direct; do
  lat[$side]='' tput[$side]='' up[$side]=''
done
for i in $(seq 1 "$rounds"); do
  for side in forward direct; do
    addr=${!side}
    l=$(latency "$addr")
    t=$(throughput "$addr")
    u=$(upload "${addr%:*}")
    lat[$side]+=" $l" tput[$side]+=" $t" up[$side]+=" $u"
    echo "round $i $side ($addr): $l ms per request, $t MB/s down, $u MB/s up" >&2
  done
done

# shellcheck disable=SC2086 # the lists are words on purpose
{
  lf=$(median ${lat[forward]}) ld=$(median ${lat[direct]})
  tf=$(median ${tput[forward]}) td=$(median ${tput[direct]})
  uf=$(median ${up[forward]}) ud=$(median ${up[direct]})
}
echo
echo "port forward vs direct to the machine (busybox httpd, median of $rounds; $(nproc) cores):"
printf '  %-28s %10s %10s %8s\n' "" forward direct ratio
printf '  %-28s %10s %10s %8s\n' "latency, ms per request" "$lf" "$ld" "$(ratio "$lf" "$ld")"
printf '  %-28s %10s %10s %8s\n' "download, MB/s ($mib MiB)" "$tf" "$td" "$(ratio "$tf" "$td")"
printf '  %-28s %10s %10s %8s\n' "upload, MB/s ($mib MiB)" "$uf" "$ud" "$(ratio "$uf" "$ud")"
