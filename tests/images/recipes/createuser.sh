# base: busybox
# busybox plus an executable /etc/machine/create-user.sh that records the CONTAINER_*
# environment it was given in /var/log/create-user.env and creates the user itself. Its layer
# is zstd-compressed, so zstd layers are exercised.
root=$WORK/layers/1
mkdir -p "$root/etc/machine" "$root/var/log"
cat > "$root/etc/machine/create-user.sh" <<'SH'
#!/bin/sh
set -e
env | grep '^CONTAINER_' | sort > /var/log/create-user.env
grep -q ":x:$CONTAINER_GID:" /etc/group || echo "$CONTAINER_USER:x:$CONTAINER_GID:" >> /etc/group
if ! grep -q "^$CONTAINER_USER:" /etc/passwd; then
  echo "$CONTAINER_USER:x:$CONTAINER_UID:$CONTAINER_GID:created by create-user.sh:$CONTAINER_HOME:${CONTAINER_SHELL:-/bin/sh}" >> /etc/passwd
  echo "$CONTAINER_USER:*:19000:0:99999:7:::" >> /etc/shadow
fi
mkdir -p "$CONTAINER_HOME"
SH
chmod 755 "$root/etc/machine/create-user.sh"
echo zstd > "$WORK/layers/1.compression"
