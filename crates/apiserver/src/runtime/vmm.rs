//! The seam between supervision and the virtual machine monitor: what a VMM is given to
//! launch one VM, and how it is asked to quit. QEMU's `microvm` is the one implementation
//! ([`super::qemu::Qemu`]); another VMM (cloud-hypervisor, Firecracker) would be another.
//! Supervision never builds a VMM command line itself.

use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::process::Command;

use async_trait::async_trait;

/// A tap device to plug into the VM, with the guest's MAC address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetDevice {
    pub tap: String,
    pub mac: String,
}

/// The host side of VMs' networks: a machine's tap is made (and bridged) before its VMM
/// starts and removed after the VMM exits, whatever the cause. Implemented by the service's
/// machine network.
#[async_trait]
pub trait TapPlumbing: Send + Sync + Debug {
    /// Creates (or reuses) the machine's tap, bridged and up; returns its name.
    async fn attach(&self, machine: &str) -> Result<String, TapError>;
    /// Removes the machine's tap. Idempotent; failures are logged, not returned.
    async fn detach(&self, machine: &str);
}

/// Why a tap could not be made: the implementation's own error, which says it all (its
/// message and causes are this error's). The runtime names the machine around it.
#[derive(Debug)]
pub struct TapError(pub Box<dyn std::error::Error + Send + Sync>);

impl std::fmt::Display for TapError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for TapError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// Everything a VMM needs to launch one VM.
#[derive(Debug, Clone)]
pub struct Launch<'a> {
    pub cpus: u32,
    pub memory_mib: u64,
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    /// The machine disk (qcow2), the guest's `/dev/vda`.
    pub disk: &'a Path,
    /// Where the serial console is written (kernel, agent and init output).
    pub console: &'a Path,
    /// The VMM's control socket (QMP for QEMU).
    pub control: &'a Path,
    /// The vhost-user socket of the vsock device.
    pub vsock: &'a Path,
    /// (tag, vhost-user socket of its virtiofsd), one per share.
    pub shares: &'a [(String, PathBuf)],
    pub net: Option<&'a NetDevice>,
}

/// A virtual machine monitor.
#[async_trait]
pub trait Vmm: Send + Sync + Debug {
    /// The program, for errors and logs.
    fn program(&self) -> &Path;
    /// The command that runs the VM in the foreground until it powers off.
    fn command(&self, launch: &Launch<'_>) -> Command;
    /// Asks a running VM's monitor, through its control socket, to exit now.
    async fn quit(&self, control: &Path) -> std::io::Result<()>;
    /// Makes the running VM write its disk to `overlay` from now on, an overlay (already
    /// made) whose backing is the image the VM has been writing, which the VM keeps open
    /// read-only.
    async fn switch_disk(&self, control: &Path, overlay: &Path) -> std::io::Result<()>;
}
