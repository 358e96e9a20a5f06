#!/usr/bin/env bash
# The main job, end to end on a fresh Debian 12 host: install what is needed, build
# everything, build a Debian 12 image with systemd locally, push it to a local registry, pull
# it, create a machine from it and run commands in it.
#
# It runs inside a network namespace of its own (the machine's network is real but reaches
# nothing else), with the service's state under target/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  exec sudo -E "$0" "$@"
fi
export PATH="$HOME/.cargo/bin:$PATH"

if [ -z "${CONTAINER_DEMO_NETNS:-}" ]; then
  scripts/install-deps.sh
  # Release binaries: the main job is what a user runs (a dev-built service pulls and
  # unpacks images several times slower).
  PROFILE=release scripts/build.sh
  image_name=${DEMO_IMAGE:-debian}
  echo "== building the $image_name test image (cached after the first run)"
  layout=$(tests/images/build.sh "$image_name" | tail -n 1)
  export CONTAINER_DEMO_LAYOUT=$layout CONTAINER_DEMO_IMAGE=$image_name CONTAINER_DEMO_NETNS=1
fi

bin=$PWD/target/install/bin
demo=$PWD/target/demo
rm -rf "$demo/run"
mkdir -p "$demo/root" "$demo/run"
export CONTAINER_ROOT=$demo/root CONTAINER_RUN_DIR=$demo/run CONTAINER_SOCKET=$demo/run/apiserver.sock
container() { echo "+ container $*" >&2; "$bin/container" "$@"; }

if [ "$CONTAINER_DEMO_NETNS" = 1 ]; then
  # The kernel comes from the distribution's packages, out of reach from inside the
  # namespace: install it first, with a service on the host's network that boots nothing.
  echo "== the guest kernel"
  container system start
  container system kernel set --recommended
  container system stop
  export CONTAINER_DEMO_NETNS=2
  exec unshare --net --fork "$0" "$@"
fi

ip link set lo up

regdir=$(mktemp -d)
cleanup() {
  "$bin/container" machine rm -f dev >/dev/null 2>&1 || true
  "$bin/container" system stop >/dev/null 2>&1 || true
  scripts/test-registry.sh stop "$regdir" >/dev/null 2>&1 || true
  rm -rf "$regdir"
}
trap cleanup EXIT

echo "== a local OCI registry on loopback"
addr=$(scripts/test-registry.sh start "$regdir" | tail -n 1)
scripts/test-registry.sh push "$regdir" "$CONTAINER_DEMO_LAYOUT" "demo/$CONTAINER_DEMO_IMAGE:12" >/dev/null
ref=$addr/demo/$CONTAINER_DEMO_IMAGE:12

echo "== the service (in a network namespace of its own)"
container system start
container system status

echo "== images"
container image pull "$ref"
container image ls
container image inspect "$ref" --format yaml | head -n 20

echo "== a machine"
"$bin/container" machine rm -f dev >/dev/null 2>&1 || true
time container machine create "$ref" --name dev --memory 1G
container machine run -n dev whoami
container machine run -n dev pwd
# The scripts below run in the guest: their expansions are the guest's, hence single quotes.
# shellcheck disable=SC2016
container machine run -n dev --no-shell -- sh -c 'echo "kernel $(uname -r) on $(hostname)"; grep PRETTY /etc/os-release'
# `create` returns once the guest agent answers; the image's init may still be starting.
# shellcheck disable=SC2016
container machine run -n dev --no-shell -- sh -c 'command -v systemctl >/dev/null || exit 0
  for i in $(seq 300); do
    s=$(systemctl is-system-running 2>/dev/null)
    case $s in running|degraded) break ;; esac
    sleep 0.2
  done
  echo "systemd: $s"'
container m ls
ip=$("$bin/container" machine inspect dev --format json | python3 -c 'import json,sys; d=json.load(sys.stdin); d=d[0] if isinstance(d, list) else d; print(d.get("ipAddress", ""))')
echo "+ ping -c 1 $ip   # the machine's address, reachable from the host side"
ping -c 1 -W 5 "$ip"
time container machine run -n dev true
container machine stop dev
container m ls
echo "== done"
