//! Where the service lives on the host. Every path can be moved with an environment variable
//! so tests and several installs can run side by side.

use std::path::PathBuf;

/// Default socket of the system-wide service.
pub const DEFAULT_SOCKET: &str = "/run/container/apiserver.sock";
/// Default data directory of the service (images, machines, kernels).
pub const DEFAULT_ROOT: &str = "/var/lib/container";
/// Default directory for runtime files (sockets, pid files) of the service.
pub const DEFAULT_RUN_DIR: &str = "/run/container";

/// The socket the CLI talks to: `CONTAINER_SOCKET`, else the default.
pub fn socket() -> PathBuf {
    std::env::var_os("CONTAINER_SOCKET")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

/// The service data directory: `CONTAINER_ROOT`, else the default.
pub fn root() -> PathBuf {
    std::env::var_os("CONTAINER_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT))
}

/// The service runtime directory: `CONTAINER_RUN_DIR`, else the default.
pub fn run_dir() -> PathBuf {
    std::env::var_os("CONTAINER_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_RUN_DIR))
}
