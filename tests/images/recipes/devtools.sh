# base: debian
# Debian with git and sqlite3, in a second layer, for the shared home's tests and benchmark
# (bench/home-share.sh, crates/e2e/tests/home_share.rs): the tools a developer runs on both
# sides of the share.
chroot_layer sh -ec "
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends git sqlite3 >/dev/null
  $(apt_clean)
"
