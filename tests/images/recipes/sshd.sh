# base: debian
# Debian with openssh-server (enabled), in a second layer, for comparing `run` with ssh. No
# host keys are baked in: every machine makes its own when sshd first starts.
chroot_layer sh -ec "
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends openssh-server >/dev/null
  $(apt_clean)
  rm -f /etc/ssh/ssh_host_*
  mkdir -p /etc/systemd/system/ssh.service.d
  printf '[Service]\nExecStartPre=\nExecStartPre=/usr/bin/ssh-keygen -A\nExecStartPre=/usr/sbin/sshd -t\n' \
    > /etc/systemd/system/ssh.service.d/host-keys.conf
  systemctl enable ssh.service
"
