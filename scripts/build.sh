#!/usr/bin/env bash
# Builds the CLI, the service and the static guest agent, and lays them out as an install
# prefix in target/install (bin/container, bin/container-apiserver, bin/container-agent).
# PROFILE=release for optimised binaries (default: dev).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
profile=${PROFILE:-dev}
dir=$([ "$profile" = dev ] && echo debug || echo "$profile")

cargo build --profile "$profile" -p container -p container-apiserver
# The agent is PID 1 of a VM with nothing else in it: it must be static. There is no musl
# target on these hosts; glibc links statically with crt-static.
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release -p container-agent --target x86_64-unknown-linux-gnu

prefix=target/install
mkdir -p "$prefix/bin"
install -m 0755 "target/$dir/container" "target/$dir/container-apiserver" "$prefix/bin/"
install -m 0755 target/x86_64-unknown-linux-gnu/release/container-agent "$prefix/bin/"
echo "build: binaries in $prefix/bin"
