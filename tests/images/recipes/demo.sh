# base: debian
# The image of the README's main job (scripts/demo.sh): Debian 12 with systemd and sudo, plus
# busybox in a second layer, for the web server (`busybox httpd`) the demo reaches from the host.
need busybox busybox-static
mkdir -p "$WORK/layers/1/usr/local/bin"
cp "$(command -v busybox)" "$WORK/layers/1/usr/local/bin/busybox"
