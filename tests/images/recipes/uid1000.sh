# base: debian
# The Debian image plus an `ubuntu` account holding uid and gid 1000 with a home, in group sudo
# (as Ubuntu images ship it), in a second layer that also deletes /etc/motd (a whiteout).
chroot_layer sh -ec '
  groupadd -g 1000 ubuntu
  useradd -m -u 1000 -g 1000 -G sudo -s /bin/bash ubuntu
  rm /etc/motd
'
