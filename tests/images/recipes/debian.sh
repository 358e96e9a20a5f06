# Debian 12 with systemd, sudo and the basics, from debootstrap (about 35 s plus packing).
need debootstrap debootstrap
root=$WORK/layers/1
mirror=$(host_mirror)
[ -n "$mirror" ] || { echo "debian.sh: no Debian mirror in this host's apt sources" >&2; exit 1; }
debootstrap --variant=minbase \
  --include=systemd,systemd-sysv,dbus,sudo,iproute2,procps,less,ncurses-base \
  bookworm "$root" "$mirror" >/dev/null
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/log/*.log \
  "$root"/var/log/apt "$root"/var/cache/debconf/*-old "$root"/var/lib/dpkg/*-old
# Empty: systemd makes one at first boot (and the agent may write the machine's own).
: > "$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
# Units that wait for hardware or a network manager a machine does not have. The agent owns
# the serial console, so no getty runs there; add a unit here to mask it too.
MASKED_UNITS="
  systemd-networkd-wait-online.service
  serial-getty@ttyS0.service
  getty@tty1.service
  systemd-timesyncd.service
  apt-daily.timer
  apt-daily-upgrade.timer
"
for unit in $MASKED_UNITS; do
  ln -sf /dev/null "$root/etc/systemd/system/$unit"
done
echo debian > "$root/etc/hostname"
cat > "$WORK/config.json" <<'JSON'
{"Cmd": ["/sbin/init"], "StopSignal": "SIGRTMIN+3",
 "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]}
JSON
