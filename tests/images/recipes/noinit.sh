# A busybox image without /sbin/init: machines must refuse it.
command -v busybox >/dev/null || apt-get install -y -qq busybox-static >/dev/null
root=$WORK/layers/1
mkdir -p "$root"/{bin,etc,tmp}
cp /bin/busybox "$root/bin/busybox"
ln -s /bin/busybox "$root/bin/sh"
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$root/etc/passwd"
echo '{"Cmd": ["/bin/sh"]}' > "$WORK/config.json"
