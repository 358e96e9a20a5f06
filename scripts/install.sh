#!/usr/bin/env bash
# Installs container from this clone, or upgrades an install in place:
#
#   sudo scripts/install.sh [--prefix P] [--root R] [--run-dir D] [--from DIR]
#
#   --prefix P   where the files go (default /usr/local):
#                  P/bin/container, container-apiserver, container-agent
#                  P/lib/systemd/system/container-apiserver.service and .socket
#                  P/share/bash-completion/completions/container
#                  P/share/zsh/site-functions/_container
#                  P/share/fish/vendor_completions.d/container.fish
#                  P/share/man/man1/container*.1
#                  P/share/container/install-manifest (what scripts/uninstall.sh removes)
#   --root R     the service's data directory (default /var/lib/container)
#   --run-dir D  its runtime directory, the API socket being D/apiserver.sock (default
#                /run/container)
#   --from DIR   take the binaries from DIR (the layout scripts/build.sh makes in
#                target/install/bin) instead of building release binaries
#
# It installs the runtime dependencies (scripts/install-deps.sh --runtime), builds, installs
# the files, then enables and starts the service through systemd, or, where systemd is not
# the init system, says so and starts it the way `container system start` does. Re-running it
# upgrades in place: binaries are replaced by rename (running processes keep the old ones),
# the service restarts, and machines keep running and are adopted by the new service.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
if [ "$(id -u)" != 0 ]; then
  exec sudo -E "$0" "$@"
fi
export PATH="$HOME/.cargo/bin:$PATH"

prefix=/usr/local
root=/var/lib/container
run_dir=/run/container
from=
usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
  case $1 in
    --prefix) prefix=${2:?--prefix needs a directory}; shift 2 ;;
    --root) root=${2:?--root needs a directory}; shift 2 ;;
    --run-dir) run_dir=${2:?--run-dir needs a directory}; shift 2 ;;
    --from) from=${2:?--from needs a directory}; shift 2 ;;
    -h|--help) usage ;;
    *) echo "install: unknown argument $1" >&2; usage ;;
  esac
done
for p in "$prefix" "$root" "$run_dir"; do
  case $p in
    /*) ;;
    *) echo "install: $p must be an absolute path" >&2; exit 2 ;;
  esac
done
prefix=${prefix%/}; root=${root%/}; run_dir=${run_dir%/}
socket=$run_dir/apiserver.sock
# The CLI and the service find the service's paths here (defaults when unset).
export CONTAINER_ROOT=$root CONTAINER_RUN_DIR=$run_dir CONTAINER_SOCKET=$socket

bindir=$prefix/bin
unitdir=$prefix/lib/systemd/system
mandir=$prefix/share/man/man1
manifest_dir=$prefix/share/container
manifest=$manifest_dir/install-manifest

echo "== runtime dependencies"
scripts/install-deps.sh --runtime

if [ -z "$from" ]; then
  echo "== release build"
  PROFILE=release scripts/build.sh
  from=$repo/target/install/bin
fi
for b in container container-apiserver container-agent; do
  [ -x "$from/$b" ] || { echo "install: $from/$b is missing (run scripts/build.sh)" >&2; exit 1; }
done

# What the last install put here: files it no longer installs are removed at the end, and
# the directories it created stay recorded so that uninstall removes them.
old_files=()
declare -A created_dirs=()
if [ -f "$manifest" ]; then
  while read -r kind path; do
    case $kind in
      file) old_files+=("$path") ;;
      dir) created_dirs[$path]=1 ;;
    esac
  done < "$manifest"
fi
new_files=()

# mkdir -p that remembers each directory it made.
make_dir() {
  local d=$1 missing=()
  while [ ! -d "$d" ]; do missing=("$d" "${missing[@]}"); d=$(dirname "$d"); done
  for d in "${missing[@]}"; do
    mkdir -m 0755 "$d"
    created_dirs[$d]=1
  done
}

# Installs one file atomically: written beside the target and renamed over it, so a running
# binary is never rewritten in place. SRC may be a process substitution (never a pipe into
# this function: its bookkeeping would stay in the pipe's subshell).
put() {
  local mode=$1 src=$2 dest=$3 tmp
  make_dir "$(dirname "$dest")"
  tmp=$(mktemp "$dest.new.XXXXXX")
  cat "$src" > "$tmp"
  chmod "$mode" "$tmp"
  mv -f "$tmp" "$dest"
  new_files+=("$dest")
}

echo "== files under $prefix"
# Others (each machine's owner runs virtiofsd; any user runs the CLI) must reach the binaries.
make_dir "$prefix"
for b in container container-apiserver container-agent; do
  put 0755 "$from/$b" "$bindir/$b"
done

args=
if [ "$root" != /var/lib/container ] || [ "$run_dir" != /run/container ]; then
  args=" --root $root --run-dir $run_dir --socket $socket"
fi
put 0644 <(sed -e "s|@BINDIR@|$bindir|g" -e "s|@ARGS@|$args|g" \
  dist/systemd/container-apiserver.service.in) "$unitdir/container-apiserver.service"
put 0644 <(sed -e "s|@SOCKET@|$socket|g" dist/systemd/container-apiserver.socket.in) \
  "$unitdir/container-apiserver.socket"

# Completion scripts call the installed binary back, by its absolute path.
put 0644 <("$bindir/container" completion bash) "$prefix/share/bash-completion/completions/container"
put 0644 <("$bindir/container" completion zsh) "$prefix/share/zsh/site-functions/_container"
put 0644 <("$bindir/container" completion fish) \
  "$prefix/share/fish/vendor_completions.d/container.fish"

pages=$(mktemp -d)
trap 'rm -rf "$pages"' EXIT
"$bindir/container" generate-man "$pages"
for page in "$pages"/*.1; do
  put 0644 "$page" "$mandir/$(basename "$page")"
done

# Files of the previous install that this one no longer has.
for old in "${old_files[@]}"; do
  keep=0
  for f in "${new_files[@]}"; do [ "$f" = "$old" ] && keep=1 && break; done
  if [ $keep = 0 ] && [ -e "$old" ]; then rm -f "$old"; fi
done

make_dir "$manifest_dir"
{
  echo "root $root"
  echo "run-dir $run_dir"
  for d in "${!created_dirs[@]}"; do echo "dir $d"; done | sort
  for f in "${new_files[@]}"; do echo "file $f"; done
  echo "file $manifest"
} > "$manifest.new"
mv -f "$manifest.new" "$manifest"
echo "install: ${#new_files[@]} files under $prefix (listed in $manifest)"

echo "== the service"
cli=$bindir/container
answering() { "$cli" system status >/dev/null 2>&1; }
if [ -d /run/systemd/system ]; then
  # A service the CLI started before systemd managed it holds the socket: hand over.
  if answering && ! systemctl is-active --quiet container-apiserver.service; then
    "$cli" system stop
  fi
  systemctl daemon-reload
  # A unit directory outside systemd's search path (an unusual prefix) is linked by path.
  units=(container-apiserver.socket container-apiserver.service)
  if ! systemd-analyze unit-paths 2>/dev/null | grep -qxF "$unitdir"; then
    units=("$unitdir/container-apiserver.socket" "$unitdir/container-apiserver.service")
  fi
  systemctl enable "${units[@]}"
  if systemctl is-active --quiet container-apiserver.service; then
    # Only the service restarts (KillMode=process): machines keep running, the new one adopts them.
    systemctl restart container-apiserver.service
  else
    systemctl start container-apiserver.socket container-apiserver.service
  fi
  "$cli" system status
else
  pid1=$(cat /proc/1/comm 2>/dev/null || echo unknown)
  cat <<MSG
install: systemd is not the init system here (PID 1 is \`$pid1\`): could not enable
  $unitdir/container-apiserver.service (nor its .socket). Start the service without
  systemd, after a reboot too, with:
    sudo container system start       (in the background; log in $root/logs/apiserver.log)
  or run the unit's ExecStart line in the foreground:
    $bindir/container-apiserver$args
install: starting it that way now.
MSG
  # An older service keeps running machines' records open: stop it (machines keep running)
  # and start the new binary, which adopts them.
  if answering; then "$cli" system stop; fi
  "$cli" system start
  "$cli" system status
fi
if [ "$socket" != /run/container/apiserver.sock ]; then
  echo "install: the service listens on $socket: export CONTAINER_SOCKET=$socket to reach it"
fi
if [[ ":$PATH:" != *":$bindir:"* ]]; then
  echo "install: add $bindir to PATH to run \`container\`"
fi
echo "install: done. Check the host with \`container system check\`."
