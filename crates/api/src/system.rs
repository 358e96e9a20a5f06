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

/// `GET /v1/system/df`: what the caller's images and machines take on the host's disk.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskUsage {
    pub images: UsageRow,
    pub machines: UsageRow,
}

/// One line of `system df`. Sizes are bytes allocated on the host, never apparent sizes.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct UsageRow {
    /// Images (distinct by digest) the caller sees, or their machines (every machine for root).
    pub total: u64,
    /// Images one of those machines was created from; machines up.
    pub active: u64,
    /// Images: their blobs and base disks, each counted once. Machines: their disks and
    /// snapshots.
    pub size: u64,
    /// Images: what `image prune --all` frees. Machines: the disks and snapshots of the
    /// stopped ones, which deleting them frees.
    pub reclaimable: u64,
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

/// What happened to a machine, in `GET /v1/system/events` (one JSON object a line).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventAction {
    Created,
    Booting,
    Running,
    Stopping,
    Stopped,
    /// The VM ended without a stop asked for: the guest powered off, crashed, or rebooted
    /// (which boots it again).
    Died,
    Deleted,
    /// A snapshot was created, restored or deleted (`detail` says which).
    Snapshot,
    /// The machine was made as a clone (`detail` names the source).
    Clone,
    /// The machine took this name (`detail` names the old one).
    Renamed,
}

impl std::fmt::Display for EventAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        f.write_str(&text)
    }
}

/// One lifecycle event of a machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    pub time: chrono::DateTime<chrono::Utc>,
    pub machine: String,
    pub action: EventAction,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}
