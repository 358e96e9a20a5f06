#!/usr/bin/env bash
# Pull + unpack of one image from one local registry, ours against `skopeo copy` + `umoci
# unpack` (what a user would otherwise script), in the same run, reported as a ratio.
#   bench/image-pull.sh [IMAGE] [ROUNDS]     IMAGE is a tests/images recipe (default debian)
# Ours ends with an ext4 base disk ready to boot; theirs with an unpacked rootfs directory.
set -euo pipefail
cd "$(dirname "$0")/.."
image=${1:-debian}
rounds=${2:-3}
bin=$PWD/target/install/bin
[ -x "$bin/container" ] || { echo "bench: build first: scripts/build.sh" >&2; exit 1; }
work=$(mktemp -d)
export CONTAINER_ROOT=$work/root CONTAINER_RUN_DIR=$work/run CONTAINER_SOCKET=$work/run/api.sock
cleanup() {
  "$bin/container" system stop >/dev/null 2>&1 || true
  scripts/test-registry.sh stop "$work/registry" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
layout=$(tests/images/build.sh "$image" | tail -n 1)
mkdir -p "$work/registry"
addr=$(scripts/test-registry.sh start "$work/registry" | tail -n 1)
scripts/test-registry.sh push "$work/registry" "$layout" "bench/$image:1"
ref=$addr/bench/$image:1
"$bin/container" system start >/dev/null

now() { date +%s.%N; }
ours=() theirs=()
for i in $(seq 1 "$rounds"); do
  "$bin/container" image rm -f "$ref" >/dev/null 2>&1 || true
  sync
  t0=$(now); "$bin/container" image pull -q "$ref"; t1=$(now)
  ours+=("$(echo "$t1 - $t0" | bc)")
  rm -rf "$work/oci" "$work/bundle"
  sync
  t0=$(now)
  skopeo copy -q --src-tls-verify=false "docker://$ref" "oci:$work/oci:bench"
  umoci unpack --image "$work/oci:bench" "$work/bundle" >/dev/null
  t1=$(now)
  theirs+=("$(echo "$t1 - $t0" | bc)")
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
m_ours=$(median "${ours[@]}")
m_theirs=$(median "${theirs[@]}")
echo "image: $image ($(du -sh "$layout" | cut -f1) in the registry), rounds: $rounds"
echo "container image pull (pull + ext4 base disk): median ${m_ours}s  [${ours[*]}]"
echo "skopeo copy + umoci unpack (rootfs dir):      median ${m_theirs}s  [${theirs[*]}]"
echo "ratio ours/theirs: $(echo "scale=2; $m_ours / $m_theirs" | bc)"
