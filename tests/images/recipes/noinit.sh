# A busybox image without /sbin/init: machines must refuse it.
need busybox busybox-static
root=$WORK/layers/1
mkdir -p "$root"/{bin,etc,tmp,root}
cp "$(command -v busybox)" "$root/bin/busybox"
for applet in sh ls cat echo env; do ln -s busybox "$root/bin/$applet"; done
chmod 1777 "$root/tmp"
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$root/etc/passwd"
printf 'root:x:0:\n' > "$root/etc/group"
echo '{"Cmd": ["/bin/sh"], "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]}' > "$WORK/config.json"
