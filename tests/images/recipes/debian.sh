# Debian 12 with systemd, sudo and the basics, from debootstrap.
command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap >/dev/null
root=$WORK/layers/1
# The mirror this host's apt uses (no mirror name is written down here).
mirror=$({ cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null || true; } \
  | awk '($1=="URIs:" || $1=="deb") && $2 !~ /security/ && !found {print $2; found=1}')
[ -n "$mirror" ] || { echo "debian.sh: no apt mirror configured on this host" >&2; exit 1; }
debootstrap --variant=minbase \
  --include=systemd,systemd-sysv,dbus,sudo,iproute2,procps,less,ncurses-base \
  bookworm "$root" "$mirror" >/dev/null
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/log/*.log
: > "$root/etc/machine-id"
# Units that wait for hardware or a network manager a machine does not have.
for unit in systemd-networkd-wait-online.service getty@tty1.service serial-getty@ttyS0.service \
            systemd-timesyncd.service apt-daily.timer apt-daily-upgrade.timer; do
  ln -sf /dev/null "$root/etc/systemd/system/$unit"
done
echo debian > "$root/etc/hostname"
cat > "$WORK/config.json" <<'JSON'
{"Cmd": ["/sbin/init"], "StopSignal": "SIGRTMIN+3",
 "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]}
JSON
