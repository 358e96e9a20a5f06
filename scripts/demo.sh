#!/usr/bin/env bash
# The main job, end to end on a fresh Debian 12 host, the way a user meets container: install
# it (scripts/install.sh: release build, files under /usr/local, the service), build a Debian
# 12 image with systemd locally, push it to a local registry, and run Apple's quickstart as a
# regular user (SUDO_USER, else a `demo` user made here) from a directory in their home:
# `whoami` and `pwd` answer as on the host, `sudo` works inside, and a web server in the
# machine (busybox httpd, serving a page from that home) is reached from the host.
#
# It runs inside a network namespace of its own (the machine's network is real but reaches
# nothing else). The service is the installed one, with its data in /var/lib/container.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  exec sudo -E "$0" "$@"
fi
export PATH="/usr/local/bin:$HOME/.cargo/bin:$PATH"

# The user who runs the quickstart: whoever called sudo, else a `demo` user.
user=${SUDO_USER:-}
if [ -z "$user" ] || [ "$user" = root ]; then
  user=demo
fi

# Stops the installed service so that one in this demo's namespace can take its socket.
stop_installed_service() {
  if [ -d /run/systemd/system ]; then
    systemctl stop container-apiserver.socket container-apiserver.service
  else
    container system stop
  fi
}

if [ -z "${CONTAINER_DEMO_NETNS:-}" ]; then
  scripts/install-deps.sh
  echo "== install (scripts/install.sh: release build, /usr/local, the service)"
  scripts/install.sh
  if ! id "$user" >/dev/null 2>&1; then
    echo "== a user for the demo: $user"
    useradd --create-home --shell /bin/bash "$user"
  fi
  image_name=${DEMO_IMAGE:-demo}
  echo "== building the $image_name test image (cached after the first run)"
  layout=$(tests/images/build.sh "$image_name" | tail -n 1)
  # The kernel comes from the distribution's packages, out of reach from inside the
  # namespace: the installed service (on the host's network, booting nothing) fetches it.
  echo "== the guest kernel"
  if container system status --format json | grep -q '"kernel": null'; then
    container system kernel set --recommended
  fi
  container system check || true
  stop_installed_service
  export CONTAINER_DEMO_LAYOUT=$layout CONTAINER_DEMO_IMAGE=$image_name CONTAINER_DEMO_NETNS=1
  exec unshare --net --fork "$0" "$@"
fi

ip link set lo up
home=$(getent passwd "$user" | cut -d: -f6)
project=$home/container-demo
demo=$PWD/target/demo
mkdir -p "$demo"
regdir=$(mktemp -d)
made_project=0
if [ ! -e "$project" ]; then made_project=1; fi

# `container ARGS` as the demo user, from the project directory, echoed as they would type it.
as_user() {
  echo "$user:${project/#$home/\~}\$ $*" >&2
  sudo -u "$user" -H sh -c 'cd "$1" && shift && exec "$@"' sh "$project" "$@"
}

cleanup() {
  sudo -u "$user" -H container machine rm -f dev >/dev/null 2>&1 || true
  container system stop >/dev/null 2>&1 || true
  scripts/test-registry.sh stop "$regdir" >/dev/null 2>&1 || true
  rm -rf "$regdir"
  if [ $made_project = 1 ]; then rm -rf "$project"; fi
  # Give the host its service back, as installed.
  if [ -d /run/systemd/system ]; then
    systemctl start container-apiserver.socket >/dev/null 2>&1 || true
  else
    echo "== the installed service is stopped; start it again with \`sudo container system start\`"
  fi
}
trap cleanup EXIT

echo "== a local OCI registry on loopback"
addr=$(scripts/test-registry.sh start "$regdir" | tail -n 1)
scripts/test-registry.sh push "$regdir" "$CONTAINER_DEMO_LAYOUT" "demo/$CONTAINER_DEMO_IMAGE:12" >/dev/null
ref=$addr/demo/$CONTAINER_DEMO_IMAGE:12

echo "== the service (in a network namespace of its own)"
# Its machines' addresses mean nothing outside this namespace: their names go in a hosts
# file of the demo's, not the host's /etc/hosts.
export CONTAINER_HOSTS_FILE=$demo/hosts
if [ -d /run/systemd/system ]; then
  # `system start` would ask systemd, whose service lives on the host's network.
  setsid /usr/local/bin/container-apiserver >>"$demo/apiserver.log" 2>&1 </dev/null &
  for _ in $(seq 200); do container system status >/dev/null 2>&1 && break; sleep 0.1; done
else
  container system start
fi
container system status

echo "== the quickstart, as $user"
sudo -u "$user" mkdir -p "$project/site"
sudo -u "$user" sh -c 'echo "hello from $(whoami)'"'"'s home, served by the machine dev" > "$1/site/index.html"' sh "$project"
sudo -u "$user" -H container machine rm -f dev >/dev/null 2>&1 || true
# --wait: back once the image's init (systemd here) has finished booting.
time as_user container machine create "$ref" --name dev --memory 1G --wait
as_user container machine run -n dev whoami
as_user container machine run -n dev pwd
as_user container machine run -n dev sudo whoami
# The scripts below run in the guest: their expansions are the guest's, hence single quotes.
# shellcheck disable=SC2016
as_user container machine run -n dev --no-shell -- sh -c 'echo "kernel $(uname -r) on $(hostname)"; grep PRETTY /etc/os-release'
# shellcheck disable=SC2016
as_user container machine run -n dev --no-shell -- sh -c 'command -v systemctl >/dev/null || exit 0
  echo "systemd: $(systemctl is-system-running)"'
as_user container m ls
echo "== a web server in the machine, reached from the host"
as_user container machine run -n dev busybox httpd -p 8080 -h "$project/site"
ip=$(sudo -u "$user" -H container machine inspect dev --format json | python3 -c 'import json,sys; d=json.load(sys.stdin); d=d[0] if isinstance(d, list) else d; print(d.get("ipAddress", ""))')
echo "+ curl http://$ip:8080/   # from the host side, to the machine's address"
curl -fsS --max-time 10 "http://$ip:8080/"
time as_user container machine run -n dev true
as_user container machine stop dev
as_user container m ls
as_user container system df
echo "== done"
