//! System-level API types: service status, configuration properties, kernel.

use serde::{Deserialize, Serialize};

/// `GET /v1/system/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SystemStatus {
    pub status: String,
    pub version: String,
    pub api_version: String,
    pub pid: u32,
    pub root: String,
    pub socket: String,
    pub started: chrono::DateTime<chrono::Utc>,
    /// The accelerator new machines get: `kvm` or `tcg`, with the reason for the choice.
    pub virtualization: String,
    pub kernel: Option<KernelInfo>,
    pub images: usize,
    pub machines: usize,
    pub machines_running: usize,
    /// What runs the service: a systemd unit, the CLI, or its own command line.
    #[serde(default)]
    pub run_by: String,
}

/// The kernel the service boots machines with.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KernelInfo {
    pub name: String,
    pub version: String,
    pub path: String,
    pub digest: String,
    pub modules: Option<String>,
}

/// One merged configuration key, as `container system property list` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Property {
    /// Dotted key, e.g. `machine.cpus`.
    pub key: String,
    pub value: serde_json::Value,
    /// The file the value came from, or `default`.
    pub source: String,
}

/// `POST /v1/system/kernel`: install the kernel new machines boot.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelSetRequest {
    /// Kernel image on the host (read by the service; root only).
    pub binary: Option<String>,
    /// Module tree (`lib/modules/<version>`) matching the binary.
    pub modules: Option<String>,
    /// Fetch the distribution's recommended cloud kernel.
    #[serde(default)]
    pub recommended: bool,
}
