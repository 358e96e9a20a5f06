#!/usr/bin/env bash
# The whole gate, the same locally and in CI: dependencies, formatting, lints, the build, the
# test images, and every test (unit, integration, end to end with real QEMU under TCG).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  exec sudo -E "$0" "$@"
fi
export PATH="$HOME/.cargo/bin:$PATH"

scripts/install-deps.sh
echo "== fmt";    cargo fmt --all -- --check
echo "== clippy"; cargo clippy --workspace --all-targets -- -D warnings
echo "== shellcheck"
shellcheck -x .ci/run scripts/*.sh bench/*.sh tests/images/*.sh
# The recipes have no shebang: tests/images/build.sh sources them into bash.
shellcheck -x -s bash tests/images/recipes/*.sh
echo "== module graph"; scripts/module-cycles.py crates/apiserver/src crates/agent/src
echo "== fuzz targets compile"; cargo check --manifest-path fuzz/Cargo.toml --bins --locked
echo "== build";  scripts/build.sh
echo "== test images"; tests/images/build.sh all
echo "== tests"
# VM tests share two cores under software emulation: one test at a time keeps them fast
# and their timings honest.
status=0
cargo test --workspace --no-fail-fast -- --test-threads="${TEST_THREADS:-1}" || status=$?
# Network namespaces the end-to-end harness made (one per test process).
for ns in $(ip netns list 2>/dev/null | awk '/^ct-e2e-/ {print $1}'); do
  ip netns delete "$ns" 2>/dev/null || true
done
exit $status
