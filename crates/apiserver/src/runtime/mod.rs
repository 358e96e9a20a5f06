//! The VM runtime: machine disks (`disk`), the kernel (`kernel`) and the initramfs built
//! around the guest agent (`initramfs`), the VMM behind a small trait (`vmm`, `qemu`), the
//! helper processes (`helpers`), the serial console (`console`) and their supervision
//! (`supervisor`, whose [`Runtime`] is the door: start, stop, status, adopt); sessions with
//! the guest agent (`session`) and the SSH agents they forward (`ssh_agent`); the host's
//! loopback forwarded to the guests' listening ports (`port_forward`); what a running
//! VM costs the host (`usage`) and giving idle guests' page cache back (`reclaim`).
//!
//! Invariants: every running VM has a `run.json` in its machine directory naming its VMM and
//! helpers by pid and start time; the VMM and helpers run in process groups of their own, so
//! the service can stop and start while machines run, and on start it adopts each machine
//! whose VMM still runs and cleans up after the others; whenever a VMM exits, its helpers
//! are killed and its runtime files removed. QEMU and vhost-device-vsock run as the VM's own
//! unprivileged user (`identity`), with what they need handed over as descriptors or placed
//! in a directory of that user's; virtiofsd runs as the share's owner.

pub mod boot_image;
pub mod console;
pub mod disk;
mod error;
pub mod helpers;
pub mod identity;
pub mod initramfs;
pub mod kernel;
pub mod port_forward;
pub mod process;
pub mod qemu;
mod qmp;
pub mod reclaim;
pub mod session;
pub mod ssh_agent;
mod supervisor;
#[allow(unsafe_code)]
mod sys;
pub mod usage;
pub mod vmm;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use container_agent_proto as proto;
use container_api::system::KernelInfo;

pub use crate::config::VmUsers;
pub use error::RuntimeError;
pub use helpers::HelperPaths;
pub use kernel::Kernel;
pub use port_forward::{PortForwards, PortPolicy};
pub use session::{ClientStream, connect, copy_in, copy_out, copy_root, exec};
pub use ssh_agent::{SshAgentTarget, SshAgents};
pub use supervisor::{Death, GuestPorts, Reboot, Runtime, stop_reason};
pub use vmm::{NetDevice, TapError, TapPlumbing, Vmm};

use crate::config::Virtualization;

/// How the runtime is set up.
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// The service's data directory (kernels, initramfs cache).
    pub root: PathBuf,
    /// Where per-VM sockets live (`<run_dir>/vm/<short id>/`); keep it short.
    pub run_dir: PathBuf,
    pub virtualization: Virtualization,
    pub helpers: HelperPaths,
    /// How long a boot may take until the agent answers (software emulation is slow).
    pub boot_timeout: Duration,
    /// Makes and removes the taps of VMs that have a network device.
    pub network: Option<Arc<dyn TapPlumbing>>,
    /// The uids VMs run as.
    pub vm_users: VmUsers,
    /// Where the files backing machine disks may be (the image store); a disk backed by
    /// anything else is refused.
    pub disk_bases: Vec<PathBuf>,
    /// TCG's translation cache in bytes; `None`: QEMU's default.
    pub tcg_translation_cache: Option<u64>,
    /// Added to every virtiofsd command line after ours (`[runtime] virtiofsd-args`).
    pub virtiofsd_args: Vec<String>,
}

impl RuntimeOptions {
    pub fn new(root: impl Into<PathBuf>, run_dir: impl Into<PathBuf>) -> Self {
        let root = root.into();
        RuntimeOptions {
            disk_bases: vec![root.join("images"), root.join("layers")],
            vm_users: VmUsers::default(),
            root,
            run_dir: run_dir.into(),
            virtualization: Virtualization::Auto,
            helpers: HelperPaths::default(),
            boot_timeout: Duration::from_secs(180),
            network: None,
            tcg_translation_cache: None,
            virtiofsd_args: Vec::new(),
        }
    }
}

/// A directory shared into the VM through virtio-fs, served as its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareSpec {
    pub tag: String,
    pub host_path: PathBuf,
    pub guest_path: String,
    pub read_only: bool,
    /// virtiofsd runs as this user, so the guest reaches only what the owner can.
    pub owner_uid: u32,
    pub owner_gid: u32,
}

/// One VM to start.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Unique among running VMs (the machine name).
    pub id: String,
    /// Holds `run.json`, `console.log`, `boot.log` and `helpers.log`.
    pub machine_dir: PathBuf,
    pub kernel: Kernel,
    /// The machine disk (qcow2).
    pub disk: PathBuf,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub shares: Vec<ShareSpec>,
    /// The agent's boot config; the runtime fills in `version`, `vsock_port`, `ready_port`, `modules`,
    /// `shares` and `time_unix_ns`.
    pub boot: proto::BootConfig,
    pub net: Option<NetDevice>,
}

/// A started VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningVm {
    pub id: String,
    /// The VMM's pid.
    pub pid: i32,
    pub run_dir: PathBuf,
    /// The hybrid-vsock socket to reach the agent (`container_agent_proto::client::AgentClient`).
    pub agent_socket: PathBuf,
    pub console: PathBuf,
    pub started: chrono::DateTime<chrono::Utc>,
}

/// Status details for `system status`.
pub fn kernel_info(root: &Path) -> Option<KernelInfo> {
    kernel::current(root)
}
