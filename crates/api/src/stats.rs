//! `GET /v1/stats` and `inspect`'s `stats`: what a machine costs the host and holds inside,
//! sampled when asked, in the style of the machine schema (camelCase, bytes).

use serde::{Deserialize, Serialize};

use crate::machine::MachineState;

/// One machine's figures. Those of a running VM are absent while it is stopped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MachineStats {
    pub id: String,
    pub status: MachineState,
    /// Host CPU the VM used since the previous sample, in percent of one core (200 is two
    /// cores busy), as `docker stats` counts. Absent without a previous sample.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_percent: Option<f64>,
    /// Host CPU time the VMM and its helpers used since they started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_time_ns: Option<u64>,
    /// Host memory held by the VMM and its helpers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_memory: Option<HostMemory>,
    /// The guest's own view of its memory; absent when its agent did not answer in time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_memory: Option<GuestMemory>,
    pub disk: DiskUsage,
    /// Bytes through the machine's network device; absent without a network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkUsage>,
}

/// Host memory of a VM: the sum over its processes, and each of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostMemory {
    /// Resident set: every page mapped, shared ones counted in full.
    pub rss: u64,
    /// Proportional set: shared pages divided among their sharers; what stopping the machine
    /// gives back, near enough.
    pub pss: u64,
    pub processes: Vec<ProcessUsage>,
}

/// One process of a VM (the VMM or a helper).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessUsage {
    /// The process's command name (`qemu-system-x86`, `virtiofsd`, …).
    pub name: String,
    pub pid: i32,
    pub rss: u64,
    pub pss: u64,
    pub cpu_time_ns: u64,
}

/// The guest's memory as its kernel counts it, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GuestMemory {
    pub total: u64,
    /// Held by programs and the kernel: total - free - cache.
    pub used: u64,
    /// Page cache, buffers and reclaimable kernel caches: given back on demand.
    pub cache: u64,
    pub free: u64,
    pub available: u64,
}

/// The machine disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DiskUsage {
    /// Bytes the disk occupies on the host.
    pub allocated: u64,
    /// The disk's virtual size.
    pub size: u64,
}

/// Bytes through the machine's network device, as the guest sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkUsage {
    /// Received by the guest.
    pub rx_bytes: u64,
    /// Sent by the guest.
    pub tx_bytes: u64,
}

/// `GET /v1/stats` query.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatsQuery {
    /// Comma-separated machine names; empty means every machine of the caller's.
    #[serde(default)]
    pub names: String,
    /// Stopped machines too (only without names: named ones are always shown).
    #[serde(default)]
    pub all: bool,
}
