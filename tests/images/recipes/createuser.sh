# base: busybox
# A busybox image whose /etc/machine/create-user.sh does the user setup itself and records
# the environment it was given. Its second layer is zstd-compressed.
WORK="$WORK" bash -euo pipefail "$(dirname "$BUILD")/recipes/busybox.sh"
root=$WORK/layers/2
mkdir -p "$root/etc/machine"
cat > "$root/etc/machine/create-user.sh" <<'SH'
#!/bin/sh
set -e
env | grep '^CONTAINER_' | sort > /var/log/create-user.env
grep -q "^$CONTAINER_USER:" /etc/passwd || \
  echo "$CONTAINER_USER:x:$CONTAINER_UID:$CONTAINER_GID::$CONTAINER_HOME:${CONTAINER_SHELL:-/bin/sh}" >> /etc/passwd
grep -q ":$CONTAINER_GID:" /etc/group || echo "$CONTAINER_USER:x:$CONTAINER_GID:" >> /etc/group
SH
chmod 755 "$root/etc/machine/create-user.sh"
echo zstd > "$WORK/layers/2.compression"
