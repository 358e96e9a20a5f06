#!/usr/bin/env bash
# Checks the test images and the registry harness with the tools a user would reach for:
# every image builds (then comes from the cache at once), skopeo reads and copies it, its
# unpacked root holds what the tests rely on, createuser's script does its job in a chroot,
# and every image goes through a real registry, with and without basic auth.
#
#   tests/images/check.sh [NAME...]      (default: every recipe; needs root)
# Ends with the line `N passed, N failed`; exits non-zero when a check failed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
names=("$@")
if [ ${#names[@]} = 0 ]; then mapfile -t names < <("$here/build.sh" list); fi

passed=0 failed=0
ok() { passed=$((passed + 1)); echo "ok    $*"; }
fail() { failed=$((failed + 1)); echo "FAIL  $*"; }
check() {  # check DESCRIPTION COMMAND...
  local what=$1
  shift
  if "$@" >/dev/null 2>&1; then ok "$what"; else fail "$what"; fi
}

tmp=$(mktemp -d)
registry=$tmp/registry
cleanup() {
  "$repo/scripts/test-registry.sh" stop "$registry" >/dev/null 2>&1 || true
  rm -rf --one-file-system "$tmp"
}
trap cleanup EXIT

# jq-free JSON reads: manifest and config of an OCI layout's `latest`.
config_of() {
  python3 - "$1" <<'PY'
import json, os, sys
d = sys.argv[1]
blob = lambda dg: json.load(open(os.path.join(d, "blobs", *dg.split(":"))))
m = blob(json.load(open(os.path.join(d, "index.json")))["manifests"][0]["digest"])
print(json.dumps({"manifest": m, "config": blob(m["config"]["digest"])}))
PY
}
field() {  # field JSON PYTHON_EXPR (j is the parsed JSON)
  python3 -c "import json,sys; j=json.loads(sys.argv[1]); print($2)" "$1"
}

declare -A layout
for name in "${names[@]}"; do
  start=$(date +%s.%N)
  if layout[$name]=$("$here/build.sh" "$name" 2>"$tmp/$name.build.log" | tail -n 1); then
    ok "$name builds ($(printf '%.1f' "$(echo "$(date +%s.%N) - $start" | bc)") s, $(du -sh "${layout[$name]}" | cut -f1))"
  else
    fail "$name builds: $(tail -n 5 "$tmp/$name.build.log")"
    continue
  fi
  start=$(date +%s.%N)
  again=$("$here/build.sh" "$name" | tail -n 1)
  elapsed=$(echo "$(date +%s.%N) - $start" | bc)
  check "$name: a second build is a cache hit (${elapsed} s)" \
    test "$again" = "${layout[$name]}" -a "$(echo "$elapsed < 1" | bc)" = 1
done

for name in "${names[@]}"; do
  d=${layout[$name]:-}
  [ -n "$d" ] || continue
  check "$name: skopeo inspects it" skopeo inspect "oci:$d:latest"
  check "$name: skopeo copies it (digests verified)" \
    skopeo copy -q "oci:$d:latest" "oci:$tmp/copy-$name:latest"
  root=$tmp/root-$name
  if ! python3 "$here/oci-pack.py" unpack "$d" "$root" 2>"$tmp/$name.unpack.log"; then
    fail "$name: unpacks: $(cat "$tmp/$name.unpack.log")"
    continue
  fi
  j=$(config_of "$d")
  cfg=$(field "$j" 'json.dumps(j["config"]["config"])')
  layers=$(field "$j" 'len(j["manifest"]["layers"])')
  check "$name: config is linux/amd64" test "$(field "$j" 'j["config"]["os"] + "/" + j["config"]["architecture"]')" = linux/amd64
  check "$name: one diff_id per layer" test "$(field "$j" 'len(j["config"]["rootfs"]["diff_ids"])')" = "$layers"
  case $name in
  busybox)
    check "busybox: /sbin/init is busybox" test "$(readlink "$root/sbin/init")" = /bin/busybox
    check "busybox: /usr/bin/env exists" test -L "$root/usr/bin/env"
    check "busybox: /tmp is 1777" test "$(stat -c %a "$root/tmp")" = 1777
    check "busybox: root in passwd, group, shadow" grep -q '^root:' "$root/etc/passwd" "$root/etc/group" "$root/etc/shadow"
    check "busybox: inittab starts no console shell" bash -c "! grep -q respawn '$root/etc/inittab'"
    check "busybox: no StopSignal" test "$(field "$cfg" 'j.get("StopSignal")')" = None
    check "busybox: rcS finds the applets it calls" bash -c "for a in grep mount mkdir hostname sync umount; do [ -L \"$root/bin/\$a\" ] || exit 1; done"
    # shellcheck disable=SC2016 # expanded by the image's shell
    check "busybox: a shell runs in it" test "$(chroot "$root" /bin/sh -c 'echo $((6*7))')" = 42
    ;;
  noinit)
    check "noinit: has no /sbin/init" test ! -e "$root/sbin/init" -a ! -L "$root/sbin/init"
    check "noinit: has a shell" test -x "$root/bin/sh"
    ;;
  debian)
    check "debian: /sbin/init is systemd" bash -c "readlink '$root/sbin/init' | grep -q systemd"
    check "debian: StopSignal SIGRTMIN+3" test "$(field "$cfg" 'j["StopSignal"]')" = SIGRTMIN+3
    check "debian: Cmd /sbin/init" test "$(field "$cfg" 'j["Cmd"]')" = "['/sbin/init']"
    check "debian: machine-id empty" test ! -s "$root/etc/machine-id" -a -e "$root/etc/machine-id"
    check "debian: sudo, ip, ps installed" test -x "$root/usr/bin/sudo" -a -x "$root/usr/bin/ps" -a -x "$root/usr/bin/ip"
    check "debian: no apt lists" bash -c "[ -z \"\$(ls -A '$root/var/lib/apt/lists' | grep -v -e lock -e partial)\" ]"
    check "debian: serial getty masked" test "$(readlink "$root/etc/systemd/system/serial-getty@ttyS0.service")" = /dev/null
    ;;
  uid1000)
    check "uid1000: two layers" test "$layers" = 2
    check "uid1000: ubuntu holds uid and gid 1000" grep -q '^ubuntu:x:1000:1000:' "$root/etc/passwd"
    check "uid1000: ubuntu is in group sudo" bash -c "grep '^sudo:' '$root/etc/group' | grep -q ubuntu"
    check "uid1000: /home/ubuntu belongs to 1000" test "$(stat -c %u:%g "$root/home/ubuntu")" = 1000:1000
    check "uid1000: the whiteout removed /etc/motd" test ! -e "$root/etc/motd"
    ;;
  createuser)
    check "createuser: second layer is zstd" test "$(field "$j" 'j["manifest"]["layers"][-1]["mediaType"]')" = application/vnd.oci.image.layer.v1.tar+zstd
    check "createuser: create-user.sh is executable" test -x "$root/etc/machine/create-user.sh"
    mkdir -p "$root/proc"
    check "createuser: create-user.sh runs" chroot "$root" /usr/bin/env -i PATH=/bin:/usr/bin \
      CONTAINER_USER=alice CONTAINER_UID=1500 CONTAINER_GID=1500 CONTAINER_HOME=/home/alice \
      CONTAINER_MACHINE_ID=m1 CONTAINER_SHELL=/bin/sh /etc/machine/create-user.sh
    check "createuser: it recorded its environment" grep -qx CONTAINER_UID=1500 "$root/var/log/create-user.env"
    check "createuser: it created the user" grep -q '^alice:x:1500:1500:' "$root/etc/passwd"
    ;;
  sshd)
    check "sshd: two layers" test "$layers" = 2
    check "sshd: sshd installed" test -x "$root/usr/sbin/sshd"
    check "sshd: no baked host keys" bash -c "! ls '$root'/etc/ssh/ssh_host_* 2>/dev/null"
    check "sshd: ssh.service enabled" test -L "$root/etc/systemd/system/multi-user.target.wants/ssh.service"
    ;;
  nginx)
    check "nginx: two layers" test "$layers" = 2
    check "nginx: nginx installed" test -x "$root/usr/sbin/nginx"
    check "nginx: nginx.service disabled" test ! -e "$root/etc/systemd/system/multi-user.target.wants/nginx.service"
    ;;
  openrc)
    check "openrc: /sbin/init is openrc-init" test "$(readlink "$root/sbin/init")" = openrc-init
    check "openrc: no systemd" test ! -e "$root/lib/systemd/systemd"
    check "openrc: no StopSignal" test "$(field "$cfg" 'j.get("StopSignal")')" = None
    check "openrc: sudo, ps, rc-status, rc-service installed" test -x "$root/usr/bin/sudo" -a \
      -x "$root/usr/bin/ps" -a -x "$root/usr/bin/rc-status" -a -x "$root/usr/sbin/rc-service"
    check "openrc: no getty or network service in a runlevel" bash -c \
      "! ls '$root'/etc/runlevels/*/ | grep -Eq '^(agetty|getty|net\\.|networking)'"
    check "openrc: sudo in default, stopmark in no runlevel" bash -c \
      "[ -L '$root/etc/runlevels/default/sudo' ] && ! ls '$root'/etc/runlevels/*/stopmark 2>/dev/null"
    check "openrc: no apt lists" bash -c "[ -z \"\$(ls -A '$root/var/lib/apt/lists' | grep -v -e lock -e partial)\" ]"
    ;;
  esac
  rm -rf --one-file-system "$root" "$tmp/copy-$name"
done

# Through a real registry: anonymous, then with basic auth.
mkdir -p "$registry"
if addr=$("$repo/scripts/test-registry.sh" start "$registry" | tail -n 1); then
  ok "registry starts ($addr)"
  check "registry: /v2/ answers 200" test "$(curl -s -o /dev/null -w '%{http_code}' "http://$addr/v2/")" = 200
  for name in "${names[@]}"; do
    [ -n "${layout[$name]:-}" ] || continue
    check "registry: push $name" "$repo/scripts/test-registry.sh" push "$registry" "${layout[$name]}" "tests/$name:1"
    check "registry: pull $name back with skopeo" \
      skopeo copy -q --src-tls-verify=false "docker://$addr/tests/$name:1" "oci:$tmp/pulled-$name:latest"
    rm -rf "$tmp/pulled-$name"
  done
  pid=$(cat "$registry/pid")
  "$repo/scripts/test-registry.sh" stop "$registry"
  check "registry: stop ends the process" bash -c "! kill -0 $pid 2>/dev/null"
else
  fail "registry starts"
fi
if command -v htpasswd >/dev/null && [ -n "${layout[busybox]:-}" ]; then
  htpasswd -Bbc "$tmp/htpasswd" alice s3cret 2>/dev/null
  addr=$("$repo/scripts/test-registry.sh" start "$registry" --htpasswd "$tmp/htpasswd" | tail -n 1)
  check "auth registry: /v2/ answers 401" test "$(curl -s -o /dev/null -w '%{http_code}' "http://$addr/v2/")" = 401
  check "auth registry: anonymous push refused" bash -c "! '$repo/scripts/test-registry.sh' push '$registry' '${layout[busybox]}' p/busybox:1"
  check "auth registry: push with credentials" env REGISTRY_CREDS=alice:s3cret \
    "$repo/scripts/test-registry.sh" push "$registry" "${layout[busybox]}" p/busybox:1
  "$repo/scripts/test-registry.sh" stop "$registry"
fi

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
