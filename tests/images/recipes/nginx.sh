# base: debian
# Debian with nginx installed but disabled, in a second layer, so a test can
# `sudo systemctl start nginx` and fetch its page.
chroot_layer sh -ec "
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends nginx >/dev/null
  $(apt_clean)
  systemctl disable nginx.service
"
