#!/usr/bin/env bash
# A real OCI registry (Debian's docker-registry) on a free loopback port, for tests, the demo
# and benchmarks.
#   test-registry.sh start DIR [--htpasswd FILE]   prints 127.0.0.1:PORT
#   test-registry.sh push DIR OCI_LAYOUT NAME:TAG   (REGISTRY_CREDS=user:pass for auth)
#   test-registry.sh stop DIR
set -euo pipefail
cmd=${1:?usage: test-registry.sh start|push|stop DIR ...}
dir=${2:?missing DIR}
case $cmd in
start)
  htpasswd=
  if [ "${3:-}" = --htpasswd ]; then htpasswd=${4:?missing htpasswd file}; fi
  mkdir -p "$dir/data"
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  {
    echo "version: 0.1"
    echo "log: {level: error}"
    echo "storage: {filesystem: {rootdirectory: $dir/data}, delete: {enabled: true}}"
    echo "http: {addr: 127.0.0.1:$port}"
    if [ -n "$htpasswd" ]; then
      echo "auth: {htpasswd: {realm: test, path: $htpasswd}}"
    fi
  } > "$dir/config.yml"
  docker-registry serve "$dir/config.yml" > "$dir/registry.log" 2>&1 &
  echo $! > "$dir/pid"
  echo "127.0.0.1:$port" > "$dir/addr"
  for _ in $(seq 1 100); do
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/v2/" || true)
    if [ "$code" = 200 ] || [ "$code" = 401 ]; then
      echo "127.0.0.1:$port"
      exit 0
    fi
    sleep 0.1
  done
  echo "test-registry: the registry did not start; log:" >&2
  cat "$dir/registry.log" >&2
  exit 1
  ;;
push)
  layout=${3:?missing OCI layout}
  ref=${4:?missing NAME:TAG}
  creds=()
  if [ -n "${REGISTRY_CREDS:-}" ]; then creds=(--dest-creds "$REGISTRY_CREDS"); fi
  skopeo copy -q --dest-tls-verify=false "${creds[@]}" "oci:$layout:latest" "docker://$(cat "$dir/addr")/$ref"
  ;;
stop)
  if [ -f "$dir/pid" ]; then
    kill "$(cat "$dir/pid")" 2>/dev/null || true
    rm -f "$dir/pid"
  fi
  ;;
*)
  echo "test-registry: unknown command $cmd" >&2
  exit 2
  ;;
esac
