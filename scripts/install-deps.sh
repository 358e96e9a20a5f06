#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian 12 host: Debian packages, the
# vhost-user helpers from crates.io, and the Rust components of the gate. Idempotent: a second
# run installs nothing and takes a second.
#
#   scripts/install-deps.sh            what building, testing and running need (the gate's set)
#   scripts/install-deps.sh --runtime  only what running machines needs (scripts/install.sh)
set -euo pipefail
runtime_only=0
case ${1:-} in
  --runtime) runtime_only=1 ;;
  "") ;;
  *) echo "usage: install-deps.sh [--runtime]" >&2; exit 2 ;;
esac

need_root() {
  if [ "$(id -u)" != 0 ]; then
    echo "install-deps: run as root (or through sudo)" >&2
    exit 1
  fi
}

# What the service runs (QEMU, qemu-img, mkfs.ext4, ip, nft), what the guest kernel's
# download needs (`kernel set --recommended`: apt-get, dpkg-deb), and what building the
# vhost-user helpers needs.
RUNTIME_PACKAGES=(
  qemu-system-x86 qemu-utils e2fsprogs iproute2 nftables libseccomp-dev libcap-ng-dev
)
PACKAGES=(
  "${RUNTIME_PACKAGES[@]}"
  debootstrap busybox-static docker-registry skopeo umoci iptables cpio zstd curl tmux sudo
  hyperfine apache2-utils python3 openssh-client bc iputils-ping shellcheck zsh fish man-db
  systemd
)
if [ $runtime_only = 1 ]; then PACKAGES=("${RUNTIME_PACKAGES[@]}"); fi

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
  need_root
  echo "install-deps: installing ${missing[*]}"
  apt-get update -qq
  # Some hosts carry a newer qemu-utils than the distribution's qemu-system-x86 accepts; pin
  # both to the version qemu-system-x86 comes in so they install together.
  qver=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
  pins=()
  if [ -n "$qver" ] && [ "$qver" != "(none)" ]; then
    pins=("qemu-utils=$qver" "qemu-block-extra=$qver")
  fi
  install=()
  for p in "${missing[@]}"; do [ "$p" = qemu-utils ] || install+=("$p"); done
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --allow-downgrades \
    "${install[@]}" "${pins[@]}" >/dev/null
fi

export PATH="$HOME/.cargo/bin:$PATH"
# The helpers go to /usr/local/bin: virtiofsd runs as each machine's owner, who must be able
# to execute it (root's ~/.cargo/bin is private).
for tool in virtiofsd vhost-device-vsock; do
  if [ ! -x "/usr/local/bin/$tool" ]; then
    if [ -x "$HOME/.cargo/bin/$tool" ]; then
      install -m 0755 "$HOME/.cargo/bin/$tool" /usr/local/bin/
    else
      echo "install-deps: cargo install $tool (about a minute)"
      cargo install --locked --quiet --root /usr/local "$tool"
    fi
  fi
done

if [ $runtime_only = 1 ]; then
  echo "install-deps: runtime ready"
  exit 0
fi
for component in rustfmt clippy; do
  rustup component list --installed 2>/dev/null | grep -q "^$component" || rustup component add "$component"
done
echo "install-deps: ready"
