#!/usr/bin/env bash
# Pull + unpack of one image from one local registry: ours (`container image pull`, which
# ends with an ext4 base disk ready to boot) against `skopeo copy` + `umoci unpack` (what a
# user would otherwise script, ending with a rootfs directory), in the same run, as a ratio.
#
#   bench/image-pull.sh [IMAGE] [ROUNDS]   IMAGE: a tests/images recipe (default debian), ROUNDS: 3
#
# CONTAINER: the CLI (default target/install/bin/container, from scripts/build.sh).
# CONTAINER_SOCKET: a running service to use; when unset or not answering, the benchmark runs
# a service of its own in a temporary root (CONTAINER_ROOT, CONTAINER_RUN_DIR) and stops it.
# Needs root (the service and the image build).
set -euo pipefail
cd "$(dirname "$0")/.."
image=${1:-debian}
rounds=${2:-3}
cli=${CONTAINER:-$PWD/target/install/bin/container}
if [ ! -x "$cli" ]; then
  echo "bench: no container CLI at $cli: build it with scripts/build.sh or set CONTAINER=PATH" >&2
  exit 1
fi
for tool in skopeo umoci docker-registry bc; do
  command -v "$tool" >/dev/null || { echo "bench: $tool is missing: scripts/install-deps.sh" >&2; exit 1; }
done

work=$(mktemp -d)
own_service=0
if [ -z "${CONTAINER_SOCKET:-}" ] || ! [ -S "$CONTAINER_SOCKET" ] \
    || ! "$cli" system status >/dev/null 2>&1; then
  own_service=1
  export CONTAINER_ROOT=$work/root CONTAINER_RUN_DIR=$work/run CONTAINER_SOCKET=$work/run/api.sock
fi
cleanup() {
  if [ $own_service = 1 ]; then "$cli" system stop >/dev/null 2>&1 || true; fi
  scripts/test-registry.sh stop "$work/registry" >/dev/null 2>&1 || true
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT

layout=$(tests/images/build.sh "$image" | tail -n 1)
mkdir -p "$work/registry"
addr=$(scripts/test-registry.sh start "$work/registry" | tail -n 1)
# A tag of its own, so a shared service's images are left alone.
ref=$addr/bench/$image:$$
scripts/test-registry.sh push "$work/registry" "$layout" "bench/$image:$$"
if [ $own_service = 1 ]; then "$cli" system start >/dev/null; fi

now() { date +%s.%N; }
ours=() theirs=()
for i in $(seq 1 "$rounds"); do
  "$cli" image rm -f "$ref" >/dev/null 2>&1 || true
  sync
  t0=$(now)
  "$cli" image pull -q "$ref"
  t1=$(now)
  ours+=("$(echo "$t1 - $t0" | bc)")
  rm -rf "$work/oci" "$work/bundle"
  sync
  t0=$(now)
  skopeo copy -q --src-tls-verify=false "docker://$ref" "oci:$work/oci:bench"
  umoci unpack --image "$work/oci:bench" "$work/bundle" >/dev/null
  t1=$(now)
  theirs+=("$(echo "$t1 - $t0" | bc)")
  echo "round $i: ours ${ours[-1]} s, skopeo+umoci ${theirs[-1]} s" >&2
done
"$cli" image rm -f "$ref" >/dev/null 2>&1 || true

median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
m_ours=$(median "${ours[@]}")
m_theirs=$(median "${theirs[@]}")
echo "image: $image ($(du -sh "$layout" | cut -f1) compressed), rounds: $rounds"
printf 'container image pull (pull + ext4 base disk): median %.2f s  [%s]\n' "$m_ours" "${ours[*]}"
printf 'skopeo copy + umoci unpack (rootfs dir):      median %.2f s  [%s]\n' "$m_theirs" "${theirs[*]}"
echo "ratio ours/theirs: $(echo "scale=2; $m_ours / $m_theirs" | bc)"
