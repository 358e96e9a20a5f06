//! The end-to-end harness: a real `container-apiserver` in a temporary root, the real
//! `container` CLI talking to it, a real `docker-registry` on 127.0.0.1, and the locally built
//! test images. Binaries come from `target/install/bin` (`scripts/build.sh` puts them there:
//! the guest agent must be the static build).
//!
//! The parts, each re-exported here: [`netns`] (the test process's network namespace),
//! [`Service`] (a service and the CLI aimed at it; services in that namespace take turns),
//! [`Registry`] and [`Throttle`] (a registry in the namespace, and a slow relay to it),
//! [`TestUser`] (the CLI as a regular user), [`kernel_config`] (the shared guest kernel) and
//! the paths of the built binaries and test images.

mod kernel;
mod netns;
mod paths;
mod registry;
mod service;
mod throttle;
mod users;

use std::process::Command;

pub use kernel::kernel_config;
pub use netns::{enter_netns, in_netns, netns};
pub use paths::{install_bin, test_image, workspace_root};
pub use registry::Registry;
pub use service::{HOSTILE_ENV, Service};
pub use throttle::Throttle;
pub use users::TestUser;

/// Runs a command and returns its stdout, failing the test with its stderr otherwise.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What the guest agent prints on the console when init ignored the stop signal and the
/// timeout ran out: a clean stop never shows it.
pub const FORCED_POWER_OFF: &str = "init did not stop the machine in time";

/// The last `n` lines of a text.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Fails in CI, skips with a message elsewhere, when a prerequisite is missing.
pub use container_testkit::require;

/// True when running as root (the service and VMs need it).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}
