//! The core's view of its side effects: the image store and the VM runtime, each behind a
//! narrow trait. The service wires the real ones (`crate::wiring`); unit tests of the core pass
//! recording fakes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use container_api::ApiError;
use container_api::machine::MachineState;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::machines::MachineRecord;

/// What machine creation needs to know about an image.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageInfo {
    pub reference: String,
    pub digest: String,
    pub has_init: bool,
    pub stop_signal: Option<String>,
    pub base_disk: PathBuf,
}

/// The image store, as the machine core uses it.
#[async_trait]
pub trait Images: Send + Sync {
    /// Resolves a local image and builds its base disk when it has none yet.
    async fn prepare(&self, reference: &str) -> Result<ImageInfo, ApiError>;
}

/// A machine's sticky address on the machine network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetLease {
    pub ip: String,
    pub mac: String,
}

/// The machine network, as the machine core uses it: one sticky lease per networked machine.
pub trait Net: Send + Sync {
    /// The machine's lease, taking a free address when it has none (idempotent).
    fn lease(&self, machine: &str) -> Result<NetLease, ApiError>;
    /// Frees the machine's address. Idempotent.
    fn release(&self, machine: &str) -> Result<(), ApiError>;
}

/// A host directory shared into a machine.
#[derive(Debug, Clone, PartialEq)]
pub struct Share {
    pub tag: String,
    pub host_path: PathBuf,
    pub guest_path: String,
    pub read_only: bool,
}

/// Everything needed to boot a machine.
#[derive(Debug, Clone)]
pub struct BootSpec {
    pub record: MachineRecord,
    pub disk: PathBuf,
    pub machine_dir: PathBuf,
    pub shares: Vec<Share>,
    /// Whether the home directory is one of the shares (else it lives on the machine disk).
    pub home_shared: bool,
}

/// A process to start in a machine.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecSpec {
    pub argv: Vec<String>,
    /// Replaces argv[0] as the process sees it (`-bash` for a login shell).
    pub arg0: Option<String>,
    pub env: Vec<String>,
    pub cwd: String,
    /// The user: a numeric uid/gid, or a name the guest resolves.
    pub user: ExecUser,
    pub tty: bool,
    pub rows: u16,
    pub cols: u16,
    pub detach: bool,
}

/// Who a process runs as.
#[derive(Debug, Clone, PartialEq)]
pub enum ExecUser {
    Ids { uid: u32, gid: Option<u32> },
    Name(String),
}

/// Byte stream of an upgraded client connection.
pub trait ClientStream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> ClientStream for T {}

/// The VM runtime, as the machine core uses it.
#[async_trait]
pub trait Vms: Send + Sync {
    /// Creates the machine disk over the image's base disk.
    async fn create_disk(&self, base: &Path, disk: &Path, size: u64) -> Result<(), ApiError>;
    /// Grows a machine disk (the guest grows its filesystem at the next boot).
    async fn grow_disk(&self, disk: &Path, size: u64) -> Result<(), ApiError>;
    /// Bytes the disk occupies on the host.
    fn disk_allocated(&self, disk: &Path) -> u64;
    /// Boots and waits until the guest agent answers.
    async fn boot(&self, spec: BootSpec) -> Result<(), ApiError>;
    /// Shuts down through the guest's init; forced after `timeout`. Idempotent.
    async fn shutdown(
        &self,
        name: &str,
        signal: Option<i32>,
        timeout: Duration,
    ) -> Result<(), ApiError>;
    fn state(&self, name: &str) -> MachineState;
    fn started(&self, name: &str) -> Option<chrono::DateTime<chrono::Utc>>;
    /// Runs a process and relays its session frames on `client` until it ends.
    async fn exec(
        &self,
        name: &str,
        spec: ExecSpec,
        client: Box<dyn ClientStream>,
    ) -> Result<(), ApiError>;
    /// Unpacks a tar stream at `path` in the machine.
    async fn copy_in(
        &self,
        name: &str,
        path: &str,
        tar: Box<dyn AsyncRead + Send + Unpin>,
    ) -> Result<(), ApiError>;
    /// Streams a tar of `path` in the machine.
    async fn copy_out(
        &self,
        name: &str,
        path: &str,
    ) -> Result<Box<dyn AsyncRead + Send + Unpin>, ApiError>;
    /// The console log (`boot`: the boot log) of a machine.
    fn log_path(&self, name: &str, boot: bool) -> PathBuf;
    /// Running machines that stopped because their guest rebooted itself.
    fn reboots(&self) -> tokio::sync::broadcast::Receiver<Reboot>;
}

/// A running machine's guest rebooted itself, which ends its VM (QEMU runs with
/// `-no-reboot`).
#[derive(Debug, Clone)]
pub struct Reboot {
    pub name: String,
    /// When the VM's end was seen.
    pub at: std::time::Instant,
}
