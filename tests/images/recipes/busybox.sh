# A tiny image: busybox-static as init, shell and tools.
command -v busybox >/dev/null || apt-get install -y -qq busybox-static >/dev/null
root=$WORK/layers/1
mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,tmp,run,root,home,var/log,usr/bin,usr/sbin}
cp /bin/busybox "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list-full); do
  [ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
done
ln -sf /bin/busybox "$root/sbin/init"
chmod 1777 "$root/tmp"
cat > "$root/etc/inittab" <<'TAB'
::sysinit:/bin/mount -t proc proc /proc
::sysinit:/bin/mount -o remount,rw /
::sysinit:/bin/hostname -F /etc/hostname
::shutdown:/bin/sync
::shutdown:/bin/umount -a -r
TAB
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$root/etc/group"
printf 'root:*:19000:0:99999:7:::\n' > "$root/etc/shadow"
chmod 640 "$root/etc/shadow"
echo busybox > "$root/etc/hostname"
printf '127.0.0.1 localhost\n' > "$root/etc/hosts"
cat > "$WORK/config.json" <<'JSON'
{"Cmd": ["/sbin/init"], "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]}
JSON
