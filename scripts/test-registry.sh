#!/usr/bin/env bash
# A real OCI registry (Debian's docker-registry, run directly: its systemd service is not used)
# on a free loopback port, for tests, the demo and benchmarks.
#
#   test-registry.sh start DIR [--htpasswd FILE] [--token]
#                                        prints 127.0.0.1:PORT (also kept in DIR/addr)
#   test-registry.sh push DIR OCI_LAYOUT NAME:TAG   pushes the layout's `latest` image
#                                                   (REGISTRY_CREDS=user:pass when auth is on)
#   test-registry.sh stop DIR                       idempotent
#
# --htpasswd alone: the registry asks for basic auth. --token: it asks for a bearer token from
# scripts/test-token-server.py on another free loopback port (DIR/token-addr), which signs
# RS256 JWTs with a self-signed certificate made here (DIR/token.crt, the registry's
# rootcertbundle); with --htpasswd too, the token server wants those credentials and gives
# anonymous callers a token that grants nothing.
#
# DIR holds the config, the blobs (DIR/data), the logs (DIR/registry.log, DIR/token.log) and
# the pid files.
set -euo pipefail
cmd=${1:?usage: test-registry.sh start|push|stop DIR ...}
dir=${2:?usage: test-registry.sh $cmd DIR ...}
here=$(dirname "$(realpath "$0")")
# Names the token server and the registry agree on; any strings will do.
token_service=test-registry
token_issuer=test-registry-token-issuer

# The HTTP status of GET /v2/ (000 when nothing answers).
v2_status() {
  curl -s -o /dev/null -m 2 -w '%{http_code}' "http://$1/v2/" 2>/dev/null || true
}

alive() { [ -f "$dir/pid" ] && kill -0 "$(cat "$dir/pid")" 2>/dev/null; }

# Stops the process whose pid is in file $1 (TERM, then KILL after 5 s); idempotent.
stop_pidfile() {
  local file=$1 pid
  [ -f "$file" ] || return 0
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

# Starts the token server; sets token_addr.
start_token_server() {
  local htpasswd=$1 args=()
  command -v openssl >/dev/null || {
    echo "test-registry: openssl is missing: apt-get install openssl" >&2
    exit 1
  }
  openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 7 \
    -subj "/CN=$token_issuer" -keyout "$dir/token.key" -out "$dir/token.crt" 2>/dev/null
  if [ -n "$htpasswd" ]; then args=(--htpasswd "$htpasswd"); fi
  rm -f "$dir/token-addr"
  setsid python3 "$here/test-token-server.py" --key "$dir/token.key" --cert "$dir/token.crt" \
    --issuer "$token_issuer" --service "$token_service" --addr-file "$dir/token-addr" \
    "${args[@]}" >> "$dir/token.log" 2>&1 < /dev/null &
  echo $! > "$dir/token.pid"
  for _ in $(seq 1 100); do
    if [ -s "$dir/token-addr" ]; then
      token_addr=$(cat "$dir/token-addr")
      return 0
    fi
    kill -0 "$(cat "$dir/token.pid")" 2>/dev/null || break
    sleep 0.1
  done
  echo "test-registry: the token server did not start; its log ($dir/token.log):" >&2
  tail -n 20 "$dir/token.log" >&2
  stop_pidfile "$dir/token.pid"
  exit 1
}

start() {
  local htpasswd='' token=''
  while [ $# -gt 0 ]; do
    case $1 in
    --htpasswd)
      htpasswd=$(realpath "${2:?--htpasswd needs a file}")
      [ -f "$htpasswd" ] || { echo "test-registry: no htpasswd file $htpasswd" >&2; exit 1; }
      shift 2
      ;;
    --token) token=1; shift ;;
    *) echo "test-registry: unknown option $1 (--htpasswd FILE, --token)" >&2; exit 2 ;;
    esac
  done
  command -v docker-registry >/dev/null || {
    echo "test-registry: docker-registry is missing: apt-get install docker-registry" >&2
    exit 1
  }
  if alive; then
    echo "test-registry: a registry already runs for $dir ($(cat "$dir/addr")); stop it first" >&2
    exit 1
  fi
  mkdir -p "$dir/data"
  dir=$(realpath "$dir")
  local token_addr=''
  if [ -n "$token" ]; then start_token_server "$htpasswd"; fi
  # The port is free when picked but could be taken before the registry binds it: retry.
  local attempt port pid code
  for attempt in 1 2 3; do
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    {
      echo "version: 0.1"
      echo "log: {level: warn}"
      echo "storage: {filesystem: {rootdirectory: $dir/data}, delete: {enabled: true}}"
      echo "http: {addr: 127.0.0.1:$port}"
      if [ -n "$token" ]; then
        echo "auth: {token: {realm: \"http://$token_addr/token\", service: $token_service,"
        echo "  issuer: $token_issuer, rootcertbundle: $dir/token.crt}}"
      elif [ -n "$htpasswd" ]; then
        echo "auth: {htpasswd: {realm: test-registry, path: $htpasswd}}"
      fi
    } > "$dir/config.yml"
    # setsid: the registry outlives this script and ignores the caller's terminal signals.
    setsid docker-registry serve "$dir/config.yml" >> "$dir/registry.log" 2>&1 < /dev/null &
    pid=$!
    echo "$pid" > "$dir/pid"
    echo "127.0.0.1:$port" > "$dir/addr"
    for _ in $(seq 1 100); do
      code=$(v2_status "127.0.0.1:$port")
      if [ "$code" = 200 ] || [ "$code" = 401 ]; then
        echo "127.0.0.1:$port"
        return 0
      fi
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    stop_pidfile "$dir/pid"
    echo "test-registry: attempt $attempt on port $port failed" >&2
  done
  stop_pidfile "$dir/token.pid"
  echo "test-registry: the registry did not start; its log ($dir/registry.log):" >&2
  tail -n 20 "$dir/registry.log" >&2
  exit 1
}

stop() {
  stop_pidfile "$dir/pid"
  stop_pidfile "$dir/token.pid"
}

push() {
  local layout=${1:?missing OCI layout} ref=${2:?missing NAME:TAG} creds=()
  [ -f "$layout/index.json" ] || { echo "test-registry: $layout is not an OCI layout" >&2; exit 1; }
  alive || { echo "test-registry: no registry runs for $dir: start it first" >&2; exit 1; }
  if [ -n "${REGISTRY_CREDS:-}" ]; then creds=(--dest-creds "$REGISTRY_CREDS"); fi
  skopeo copy -q --dest-tls-verify=false "${creds[@]}" \
    "oci:$layout:latest" "docker://$(cat "$dir/addr")/$ref"
}

case $cmd in
start) start "${@:3}" ;;
stop) stop ;;
push) push "${@:3}" ;;
*)
  echo "test-registry: unknown command $cmd (start, push or stop)" >&2
  exit 2
  ;;
esac
