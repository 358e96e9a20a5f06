//! The seam between supervision and the virtual machine monitor: what a VMM is given to
//! launch one VM, and how it is asked to quit. QEMU's `microvm` is the one implementation
//! ([`super::qemu::Qemu`]); another VMM (cloud-hypervisor, Firecracker) would be another.
//! Supervision never builds a VMM command line itself. The VMM is handed open descriptors
//! (disk, console, control socket, share connections, tap) and paths relative to its working
//! directory only: it runs as the VM's own unprivileged user, which may open nothing else.

use std::fmt::Debug;
use std::os::fd::OwnedFd;
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
    /// Opens a tap made by `attach`, for a VMM that may not open it itself.
    fn open(&self, tap: &str) -> Result<OwnedFd, TapError>;
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

/// How a disk file holds its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Qcow2,
    Raw,
}

impl DiskFormat {
    pub fn name(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }
}

/// One file of a machine disk's chain, opened by the service.
#[derive(Debug)]
pub struct DiskLayer {
    pub format: DiskFormat,
    /// The file opened read-write (the top layer only) and read-only.
    pub files: Vec<OwnedFd>,
    pub read_only: bool,
}

/// Everything a VMM needs to launch one VM. Paths are relative to the VMM's working
/// directory (or absolute, for a VMM started by hand).
#[derive(Debug)]
pub struct Launch {
    pub cpus: u32,
    pub memory_mib: u64,
    /// The kernel image, open (the VMM reopens it through `/proc/self/fd`).
    pub kernel: OwnedFd,
    pub initrd: PathBuf,
    /// The machine disk, the guest's `/dev/vda`: its top layer first, then what backs it.
    pub disk: Vec<DiskLayer>,
    /// Where the serial console is written (kernel, agent and init output), open for
    /// appending.
    pub console: OwnedFd,
    /// The VMM's control socket (QMP for QEMU), listening.
    pub control: OwnedFd,
    /// The vhost-user socket of the vsock device.
    pub vsock: PathBuf,
    /// (tag, connection to its virtiofsd's vhost-user socket), one per share.
    pub shares: Vec<(String, OwnedFd)>,
    /// The network device and its open tap.
    pub net: Option<(NetDevice, OwnedFd)>,
}

/// A virtual machine monitor.
#[async_trait]
pub trait Vmm: Send + Sync + Debug {
    /// The program, for errors and logs.
    fn program(&self) -> &Path;
    /// The command that runs the VM in the foreground until it powers off; it owns the
    /// launch's descriptors.
    fn command(&self, launch: Launch) -> Command;
    /// Whether the VMM needs `/dev/kvm` (its group is then the VMM's one extra group).
    fn uses_kvm(&self) -> bool {
        false
    }
    /// Asks a running VM's monitor, through its control socket, to exit now.
    async fn quit(&self, control: &Path) -> std::io::Result<()>;
    /// Makes the running VM write its disk to `overlay` from now on, an overlay (already
    /// made) whose backing is the image the VM has been writing, which the VM keeps open
    /// read-only.
    async fn switch_disk(&self, control: &Path, overlay: &Path) -> std::io::Result<()>;
}
