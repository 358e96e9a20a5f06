# shellcheck shell=bash
# Helpers for recipes, sourced by build.sh before a recipe runs (never run on its own).
#
# A recipe fills $WORK/layers/N (N = 1, 2, ...: one directory tree per layer it adds, OCI
# whiteouts included) and may write $WORK/config.json (the image config's `config` object).
# A recipe whose first line is `# base: NAME` gets NAME's layers and config first; its own
# layers go on top. Everything a recipe mounts lives under $WORK and is unmounted by build.sh
# before $WORK is removed, even when the recipe fails.

# Installs the Debian package PKG when COMMAND is missing.
need() {
  local cmd=$1 pkg=$2
  command -v "$cmd" >/dev/null 2>&1 && return 0
  echo "recipe: installing $pkg" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null 2>&1 || {
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null
  }
}

# The Debian mirror this host's apt uses, read from its sources (no mirror is named in the
# repository).
host_mirror() {
  { cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null || true; } \
    | awk '($1=="URIs:" || ($1=="deb" && $2 !~ /^\[/)) && $2 !~ /security/ && !found {print $2; found=1}'
}

# Unpacks the base image (all its layers, whiteouts applied) into $WORK/base-rootfs once and
# prints that path.
base_rootfs() {
  local dir=$WORK/base-rootfs
  if [ ! -e "$dir/.complete" ]; then
    [ -n "${BASE_LAYOUT:-}" ] || { echo "recipe: base_rootfs needs a '# base: NAME' line" >&2; return 1; }
    rm -rf --one-file-system "$dir"
    python3 "$IMAGES/oci-pack.py" unpack "$BASE_LAYOUT" "$dir" >&2
    touch "$dir/.complete"
  fi
  echo "$dir"
}

# Runs COMMAND... chrooted in the base rootfs with an overlay on top, and turns what it changed
# into the recipe's first layer directory ($WORK/layers/1): new and changed files as they are,
# deleted ones as OCI whiteouts, directories it replaced as opaque. The chroot has /proc and the
# host's DNS settings, and services are kept from starting (policy-rc.d), as in a Docker build.
# Once per recipe: the layer it writes is not an overlay lower afterwards.
chroot_layer() {
  local lower upper=$WORK/layers/1 ovl_work=$WORK/overlay-work merged=$WORK/merged rc=0
  [ ! -e "$upper" ] || { echo "recipe: chroot_layer runs once per recipe" >&2; return 1; }
  lower=$(base_rootfs)
  mkdir -p "$upper" "$ovl_work" "$merged"
  if ! mount -t overlay overlay \
      -o "lowerdir=$lower,upperdir=$upper,workdir=$ovl_work,redirect_dir=off,metacopy=off,index=off" \
      "$merged"; then
    echo "recipe: cannot mount an overlay filesystem (is the overlay module available?)" >&2
    return 1
  fi
  mount -t proc proc "$merged/proc"
  # The host's resolver for apt, bind-mounted so the image's own file is left untouched (only
  # over a regular file: a symlink would be followed on the host side).
  local resolv=0
  if [ -f "$lower/etc/resolv.conf" ] && [ ! -L "$lower/etc/resolv.conf" ]; then
    mount --bind -o ro /etc/resolv.conf "$merged/etc/resolv.conf" && resolv=1
  fi
  printf '#!/bin/sh\nexit 101\n' > "$merged/usr/sbin/policy-rc.d"
  chmod 755 "$merged/usr/sbin/policy-rc.d"
  DEBIAN_FRONTEND=noninteractive LC_ALL=C chroot "$merged" "$@" || rc=$?
  rm -f "$merged/usr/sbin/policy-rc.d"
  [ $resolv = 0 ] || umount "$merged/etc/resolv.conf"
  umount "$merged/proc"
  umount "$merged"
  rm -rf --one-file-system "$ovl_work" "$merged"
  [ $rc = 0 ] || { echo "recipe: '$*' failed in the chroot (exit $rc)" >&2; return $rc; }
  python3 "$IMAGES/oci-pack.py" overlay-to-oci "$upper" "$lower"
}

# Cleans what apt leaves behind in a layer: caches, lists and logs.
apt_clean() {
  # shellcheck disable=SC2016
  echo 'apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log /var/cache/debconf/*-old /var/lib/dpkg/*-old'
}
