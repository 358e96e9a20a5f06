# A tiny image: busybox-static as init, shell and every tool, in one layer.
# busybox init powers off on SIGUSR2, which the agent knows, so the config has no StopSignal.
need busybox busybox-static
root=$WORK/layers/1
mkdir -p "$root"/{bin,sbin,etc/init.d,proc,sys,dev,tmp,run,root,home,var/log,usr/bin,usr/sbin}
cp "$(command -v busybox)" "$root/bin/busybox"
# Applet links as `busybox --install -s` makes them (/usr/bin/env among them), relative so
# they resolve the same inside and outside a chroot.
for applet in $("$root/bin/busybox" --list-full); do
  if [ ! -e "$root/$applet" ]; then
    case $applet in
      bin/*) ln -s busybox "$root/$applet" ;;
      *) ln -s /bin/busybox "$root/$applet" ;;
    esac
  fi
done
if [ ! -L "$root/sbin/init" ] || [ ! -L "$root/usr/bin/env" ]; then
  echo "busybox.sh: this busybox lacks the init or env applet" >&2
  exit 1
fi
chmod 1777 "$root/tmp"
chmod 700 "$root/root"
# Quiet init: no console shell (the agent owns the console), mounts only what is not there yet.
cat > "$root/etc/inittab" <<'TAB'
::sysinit:/etc/init.d/rcS
::shutdown:/bin/sync
::shutdown:/bin/umount -a -r
TAB
cat > "$root/etc/init.d/rcS" <<'SH'
#!/bin/sh
# Debian's busybox has no `mountpoint`: /proc/mounts says what is mounted.
mounted() { grep -qs " $1 " /proc/mounts; }
mounted /proc || mount -t proc proc /proc
mounted /sys || mount -t sysfs sysfs /sys
mkdir -p /dev/pts /dev/shm
mounted /dev/pts || mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -o remount,rw / 2>/dev/null
[ -s /etc/hostname ] && hostname -F /etc/hostname
exit 0
SH
chmod 755 "$root/etc/init.d/rcS"
cat > "$root/etc/passwd" <<'TXT'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
TXT
cat > "$root/etc/group" <<'TXT'
root:x:0:
tty:x:5:
wheel:x:10:root
users:x:100:
nogroup:x:65534:
TXT
printf 'root:*:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\n' > "$root/etc/shadow"
chmod 640 "$root/etc/shadow"
echo busybox > "$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' > "$root/etc/hosts"
printf '/bin/sh\n' > "$root/etc/shells"
cat > "$WORK/config.json" <<'JSON'
{"Cmd": ["/sbin/init"], "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]}
JSON
