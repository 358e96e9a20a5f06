# Debian 12 with OpenRC as init, from debootstrap (minbase: no systemd, no sysvinit scripts),
# with sudo and procps: /sbin/init is openrc-init, which the agent stops with its own signal
# (so no StopSignal here). About 40 s plus packing.
need debootstrap debootstrap
root=$WORK/layers/1
mirror=$(host_mirror)
[ -n "$mirror" ] || { echo "openrc.sh: no Debian mirror in this host's apt sources" >&2; exit 1; }
debootstrap --variant=minbase --include=openrc,sudo,procps bookworm "$root" "$mirror" >/dev/null
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/log/*.log \
  "$root"/var/log/apt "$root"/var/cache/debconf/*-old "$root"/var/lib/dpkg/*-old
# Merged /usr: /sbin is usr/sbin, so the relative link resolves in and out of the image.
[ -x "$root/sbin/openrc-init" ] || { echo "openrc.sh: this openrc has no openrc-init" >&2; exit 1; }
ln -s openrc-init "$root/sbin/init"
# The runlevels the packages' update-rc.d calls filled: sysinit keeps cgroups, default keeps
# sudo (it clears stale timestamps). Out: hwclock.sh (the agent sets the clock) and procps
# (sysctl), whose LSB headers need initscripts' mountdevsubfs and mountkernfs, absent here
# (the agent mounted /dev, /proc, /sys and /run): OpenRC notes that once a boot when it caches
# the dependencies. No getty (the agent owns the serial console) and no network service (the
# agent configured eth0 before init started; minbase has no ifupdown): none may creep in.
rm -f "$root"/etc/runlevels/*/hwclock.sh "$root"/etc/runlevels/*/procps
for link in "$root"/etc/runlevels/*/*; do
  case ${link##*/} in
    agetty* | getty* | net.* | networking | network | dhcpcd)
      echo "openrc.sh: $link should not be in a runlevel" >&2
      exit 1
      ;;
  esac
done
# A native OpenRC service in no runlevel, for `sudo rc-service stopmark start`: a daemon
# started by start-stop-daemon whose stop writes /var/log/stopmark.stopped, so a test can see
# OpenRC stopped it on the way down. (Debian's LSB scripts, run by rc-service directly, are
# not tracked by OpenRC and so are not stopped at shutdown, only killed.)
cat > "$root/etc/init.d/stopmark" <<'SH'
#!/sbin/openrc-run
description="Test daemon whose stop leaves a mark on the disk"
command=/bin/sleep
command_args=infinity
command_background=yes
pidfile=/run/${RC_SVCNAME}.pid

start_pre() {
	rm -f /var/log/stopmark.stopped
}

stop_post() {
	echo "stopped by openrc ($RC_RUNLEVEL)" > /var/log/stopmark.stopped
}
SH
chmod 755 "$root/etc/init.d/stopmark"
echo openrc > "$root/etc/hostname"
cat > "$WORK/config.json" <<'JSON'
{"Cmd": ["/sbin/init"],
 "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]}
JSON
