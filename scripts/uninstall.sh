#!/usr/bin/env bash
# Removes what scripts/install.sh installed, exactly: the files and directories listed in
# its manifest (PREFIX/share/container/install-manifest). The service's data (images,
# machines, kernels) stays unless --purge. Runtime dependencies (QEMU, virtiofsd, …) stay:
# other software may use them.
#
#   sudo scripts/uninstall.sh [--prefix P] [--purge] [--force]
#
#   --prefix P  the prefix given to install.sh (default /usr/local)
#   --purge     also delete the data directory (default /var/lib/container) and the runtime
#               directory
#   --force     stop running machines first (otherwise running machines make it refuse:
#               without a service nobody could stop them)
set -euo pipefail
if [ "$(id -u)" != 0 ]; then
  exec sudo -E "$0" "$@"
fi

prefix=/usr/local
purge=0
force=0
usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
  case $1 in
    --prefix) prefix=${2:?--prefix needs a directory}; shift 2 ;;
    --purge) purge=1; shift ;;
    --force) force=1; shift ;;
    -h|--help) usage ;;
    *) echo "uninstall: unknown argument $1" >&2; usage ;;
  esac
done
prefix=${prefix%/}
manifest=$prefix/share/container/install-manifest
if [ ! -f "$manifest" ]; then
  echo "uninstall: nothing installed under $prefix (no $manifest)" >&2
  exit 1
fi

root=
run_dir=
files=()
dirs=()
while read -r kind path; do
  case $kind in
    root) root=$path ;;
    run-dir) run_dir=$path ;;
    file) files+=("$path") ;;
    dir) dirs+=("$path") ;;
  esac
done < "$manifest"
export CONTAINER_ROOT=$root CONTAINER_RUN_DIR=$run_dir CONTAINER_SOCKET=$run_dir/apiserver.sock
cli=$prefix/bin/container

if [ -x "$cli" ] && "$cli" system status >/dev/null 2>&1; then
  running=$("$cli" machine ls --format json | python3 -c '
import json, sys
print(" ".join(m["id"] for m in json.load(sys.stdin) if m.get("status") in ("running", "starting")))')
  if [ -n "$running" ]; then
    if [ $force = 0 ]; then
      echo "uninstall: machines are running ($running); stop them (\`container machine stop NAME\`) or pass --force" >&2
      exit 1
    fi
    for m in $running; do "$cli" machine stop "$m"; done
  fi
fi

echo "== the service"
if [ -d /run/systemd/system ]; then
  systemctl disable --now container-apiserver.socket container-apiserver.service 2>/dev/null || true
fi
if [ -x "$cli" ]; then "$cli" system stop || true; fi

echo "== machine names on the host"
# The service's managed block (CONTAINER_HOSTS_FILE: the file a test's service used), and
# systemd-resolved's settings for the bridge it made (default name).
hosts=${CONTAINER_HOSTS_FILE:-/etc/hosts}
if [ -f "$hosts" ] && grep -qx '# BEGIN container machines' "$hosts"; then
  tmp=$(mktemp "$(dirname "$hosts")/.hosts.uninstall.XXXXXX")
  awk '$0 == "# BEGIN container machines" { skip = 1; next }
       skip && $0 == "# END container machines" { skip = 0; next }
       !skip' "$hosts" > "$tmp"
  chmod --reference="$hosts" "$tmp"
  mv -f "$tmp" "$hosts" || { cat "$tmp" > "$hosts"; rm -f "$tmp"; }
  echo "uninstall: removed the machine names from $hosts"
fi
if [ -z "${CONTAINER_HOSTS_FILE:-}" ] && command -v resolvectl >/dev/null 2>&1 \
    && ip link show container0 >/dev/null 2>&1; then
  resolvectl revert container0 2>/dev/null || true
fi

echo "== files under $prefix"
removed=0
for path in "${files[@]}"; do
  if [ -e "$path" ] || [ -L "$path" ]; then
    rm -f "$path"
    removed=$((removed + 1))
  fi
done
# Directories install made, deepest first, when nothing else lives in them.
printf '%s\n' "${dirs[@]}" | sort -r | while read -r dir; do
  if [ -n "$dir" ]; then rmdir "$dir" 2>/dev/null || true; fi
done
if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
echo "uninstall: removed $removed files"

if [ $purge = 1 ]; then
  for d in "$root" "$run_dir"; do
    case $d in
      /?*) ;;
      *) echo "uninstall: the manifest names no usable data directory ($d); not purging" >&2; exit 1 ;;
    esac
  done
  echo "uninstall: deleting the data directory $root and the runtime directory $run_dir"
  rm -rf --one-file-system "$root" "$run_dir"
else
  echo "uninstall: kept the data directory $root (delete it with --purge)"
fi
