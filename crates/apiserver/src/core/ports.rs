//! The core's view of its side effects, each behind a narrow trait: the image store
//! ([`Images`]), the VM runtime ([`Vms`]), the machine network ([`Net`]), the kernel and the
//! accelerator ([`Platform`]), and the host's users and paths ([`Host`]). The core touches
//! nothing else outside its own machine records. The service wires the real ones
//! (`crate::wiring`, one file per port); unit tests of the core pass recording fakes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use container_api::ApiError;
use container_api::image::{ImageDetail, ImageSummary, LoginRequest, PullEvent, RemoveReport};
use container_api::machine::{MachineState, MachineUser};
use container_api::ports::{PortForward, Publish};
use container_api::system::{KernelInfo, KernelSetRequest};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::machines::MachineRecord;

/// What machine creation needs to know about an image.
#[derive(Debug)]
pub struct ImageInfo {
    pub reference: String,
    pub digest: String,
    pub has_init: bool,
    pub stop_signal: Option<String>,
    pub base_disk: PathBuf,
    /// Keeps the image and its base disk from being collected while it lives: a create
    /// holds it until the machine is recorded, from when the machine keeps them.
    pub hold: ImageHold,
}

/// See [`ImageInfo::hold`]; whatever the store holds the image with.
#[derive(Default)]
pub struct ImageHold(pub Option<Box<dyn std::any::Any + Send + Sync>>);

impl std::fmt::Debug for ImageHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "held" } else { "not held" })
    }
}

/// A byte stream the core passes through (archives, tar streams).
pub type Bytes = Box<dyn AsyncRead + Send + Unpin>;

/// Manifest digests in use by machines (every machine's, so their base disks are kept), each
/// with the names of those machines the caller may see (removing the last name of an image
/// one of them uses is refused; an entry without names never refuses).
pub type InUse = BTreeMap<String, Vec<String>>;

/// Whose image names an image operation reads and writes. A user's reads fall back to the
/// system-wide names; writes touch only the namespace given. Which namespace a caller may act
/// in is the core's decision: the port does as it is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Namespace {
    /// A host user's own names.
    User(u32),
    /// The names root publishes for every user to read.
    System,
}

/// What images take on disk ([`Images::usage`]), in allocated bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImageUsage {
    /// The blobs and base disks the images hold, each counted once.
    pub bytes: u64,
    /// What untagging the names given frees.
    pub reclaimable: u64,
}

/// An image to make of a machine's filesystem ([`Images::commit`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Commit {
    /// The manifest digest of the machine's image, whose config the new image keeps.
    pub base: String,
    /// The name to give it.
    pub reference: String,
    /// Labels added to the base's.
    pub labels: BTreeMap<String, String>,
    /// What made it, for the image's history.
    pub created_by: String,
}

/// The image store and the registries behind it. Names live in a [`Namespace`]; blobs and
/// base disks are shared by digest.
#[async_trait]
pub trait Images: Send + Sync {
    /// The names `ns` sees (a user's own, then the system's they do not shadow).
    async fn list(&self, ns: Namespace) -> Result<Vec<ImageSummary>, ApiError>;
    /// Every namespace's names, each with its owner.
    async fn list_all(&self) -> Result<Vec<ImageSummary>, ApiError>;
    async fn inspect(&self, ns: Namespace, reference: &str) -> Result<ImageDetail, ApiError>;
    /// Points `target`, in `ns`, at the image `source` names as `ns` sees it.
    async fn tag(
        &self,
        ns: Namespace,
        source: &str,
        target: &str,
    ) -> Result<ImageSummary, ApiError>;
    /// Pulls with `uid`'s registry credentials, builds the base disk and records the name in
    /// `ns`; progress goes to `events` (never blocking on a slow reader).
    async fn pull(
        &self,
        uid: u32,
        ns: Namespace,
        reference: &str,
        events: tokio::sync::mpsc::Sender<PullEvent>,
    ) -> Result<ImageSummary, ApiError>;
    /// Pushes the image `ns` sees as `reference` to its registry with `uid`'s registry
    /// credentials; progress goes to `events` (never blocking on a slow reader).
    async fn push(
        &self,
        uid: u32,
        ns: Namespace,
        reference: &str,
        events: tokio::sync::mpsc::Sender<PullEvent>,
    ) -> Result<ImageSummary, ApiError>;
    /// Loads the images of an OCI-layout or `docker save` archive, named in `ns`.
    async fn load(&self, ns: Namespace, archive: Bytes) -> Result<Vec<ImageSummary>, ApiError>;
    /// Makes an image of `tar` (a machine's whole filesystem) as `commit` says and names it
    /// in `ns`, replacing what that name pointed at there only.
    async fn commit(
        &self,
        ns: Namespace,
        commit: Commit,
        tar: Bytes,
    ) -> Result<ImageSummary, ApiError>;
    /// An OCI-layout archive of these references, as `ns` sees them.
    async fn save(&self, ns: Namespace, references: Vec<String>) -> Result<Bytes, ApiError>;
    /// Untags `reference` in `ns`, deleting what no other name (of any namespace) or machine
    /// (`in_use`) needs.
    async fn remove(
        &self,
        ns: Namespace,
        reference: &str,
        in_use: InUse,
        force: bool,
    ) -> Result<RemoveReport, ApiError>;
    /// What the images `ns` sees hold on disk, and what untagging its names `untag` would
    /// then free, as [`remove`](Images::remove) of each would. Changes nothing.
    async fn usage(
        &self,
        ns: Namespace,
        untag: Vec<String>,
        in_use: InUse,
    ) -> Result<ImageUsage, ApiError>;
    /// Checks and stores `uid`'s credentials for a registry.
    async fn login(&self, uid: u32, login: LoginRequest) -> Result<(), ApiError>;
    /// Forgets `uid`'s credentials for `server`; false when there were none.
    async fn logout(&self, uid: u32, server: &str) -> Result<bool, ApiError>;
    /// Resolves a local image as `ns` sees it and builds its base disk when it has none yet.
    async fn prepare(&self, ns: Namespace, reference: &str) -> Result<ImageInfo, ApiError>;
}

/// The kernel machines boot and the accelerator they run on.
#[async_trait]
pub trait Platform: Send + Sync {
    /// How machines are accelerated, and why (KVM, or TCG and the reason).
    fn virtualization(&self) -> String;
    /// The installed kernel, if any.
    fn kernel(&self) -> Option<KernelInfo>;
    /// Installs the kernel machines boot from now on.
    async fn set_kernel(&self, request: KernelSetRequest) -> Result<KernelInfo, ApiError>;
    /// Installs the recommended kernel unless one is installed (a first boot needs one);
    /// the kernel installed, when this call installed it.
    async fn ensure_kernel(&self) -> Result<Option<KernelInfo>, ApiError>;
}

/// The host's users and file system, as the service sees them on a caller's behalf.
pub trait Host: Send + Sync {
    /// The passwd entry of `uid`, which becomes the machine user.
    fn user(&self, uid: u32) -> Result<MachineUser, ApiError>;
    /// Whether `uid` (with `gid` and its supplementary groups) can read and enter the
    /// directory `path`, decided by the kernel as for the user's own processes.
    fn can_read_dir(&self, uid: u32, gid: u32, path: &str) -> Result<bool, ApiError>;
    fn is_file(&self, path: &Path) -> bool;
    fn is_dir(&self, path: &Path) -> bool;
}

/// A machine's sticky address on the machine network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetLease {
    pub ip: String,
    pub mac: String,
}

/// The machine network, as the machine core uses it: one sticky lease per networked machine.
pub trait Net: Send + Sync {
    /// The machine's lease, taking a free address when it has none (idempotent); `owner`
    /// decides which machines it may reach on the network (those of the same owner).
    fn lease(&self, machine: &str, owner: u32) -> Result<NetLease, ApiError>;
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
    /// Exactly these supplementary groups, instead of the user's memberships in the guest's
    /// /etc/group (`run --root --gid G`).
    pub groups: Option<Vec<u32>>,
    pub tty: bool,
    pub rows: u16,
    pub cols: u16,
    pub detach: bool,
    /// The caller's SSH agent, forwarded into the machine while the process runs.
    pub ssh_agent: Option<SshAgentForward>,
}

/// A caller's SSH agent to forward into a machine. The runtime connects to it with this
/// identity (never as root), so it reaches only what the caller's own processes can.
#[derive(Debug, Clone, PartialEq)]
pub struct SshAgentForward {
    /// The agent's socket on the host (the caller's `SSH_AUTH_SOCK`), absolute.
    pub path: String,
    pub uid: u32,
    pub gid: u32,
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
    /// Freezes what the disk of machine `name` holds now into a new shared read-only layer,
    /// returned, under an empty overlay that the machine goes on with. A running machine
    /// keeps running (its guest's filesystem is frozen for the moment the switch takes).
    async fn freeze_disk(&self, name: &str, disk: &Path) -> Result<PathBuf, ApiError>;
    /// Makes `disk` (replacing it if it exists) an empty overlay over the shared `layer`.
    async fn disk_from_layer(&self, layer: &Path, disk: &Path) -> Result<(), ApiError>;
    /// Deletes the shared layers that no chain from `roots` (machine disks and snapshot
    /// layers: everything that may still be read) reaches.
    async fn collect_layers(&self, roots: Vec<PathBuf>) -> Result<(), ApiError>;
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
    /// Why the machine's VM was last forced off or failed to boot (cleared at each start).
    fn stop_reason(&self, _name: &str) -> Option<String> {
        None
    }
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
    /// A connection to TCP `port` on the running machine's loopback (through its agent, so
    /// without the machine network): its raw bytes.
    async fn connect(&self, name: &str, _port: u16) -> Result<Box<dyn ClientStream>, ApiError> {
        Err(ApiError::internal(format!(
            "machine `{name}`: this runtime cannot connect to guest ports"
        )))
    }
    /// Streams a tar of the machine's root filesystem alone (no other mount, no /proc, /sys,
    /// /dev, /run or /tmp contents), for a commit.
    async fn copy_root(&self, name: &str) -> Result<Box<dyn AsyncRead + Send + Unpin>, ApiError>;
    /// The console log (`boot`: the boot log) of a machine.
    fn log_path(&self, name: &str, boot: bool) -> PathBuf;
    /// Running machines that stopped because their guest rebooted itself.
    fn reboots(&self) -> tokio::sync::broadcast::Receiver<Reboot>;
    /// Names of machines whose VM ended while running, without a stop asked for. A runtime
    /// that cannot tell reports none.
    fn deaths(&self) -> tokio::sync::broadcast::Receiver<Death> {
        tokio::sync::broadcast::channel(1).1
    }
    /// What a running machine's VM costs the host and holds inside now; `None` unless it
    /// runs.
    async fn stats(&self, name: &str) -> Option<VmStats>;
    /// Forwards host ports to the machine's VM as `plan` says from now until it stops,
    /// replacing what was forwarded to it; `None` forwards nothing.
    fn forward_ports(&self, _name: &str, _plan: Option<PortsPlan>) {}
    /// The host ports forwarded (or refused) to the machine's VM now.
    fn ports(&self, _name: &str) -> Vec<PortForward> {
        Vec::new()
    }
}

/// What to forward from the host to a running machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortsPlan {
    /// Follow the guest's listening ports (`forward-ports=on`).
    pub watch: bool,
    /// Host ports forwarded to guest ports whatever the guest listens on.
    pub publish: Vec<Publish>,
}

/// A running machine's VM ended without anyone asking.
#[derive(Debug, Clone)]
pub struct Death {
    pub name: String,
    /// Its guest ended itself (powered off or rebooted); otherwise it crashed or was killed.
    pub clean: bool,
}

/// One sample of a running VM.
#[derive(Debug, Clone, PartialEq)]
pub struct VmStats {
    /// Host CPU time of the VMM and its helpers since they started.
    pub cpu_time_ns: u64,
    /// Percent of one core since the previous sample of this VM, when there is a recent one.
    pub cpu_percent: Option<f64>,
    pub host_memory: container_api::stats::HostMemory,
    /// Absent when the guest's agent did not answer in time.
    pub guest_memory: Option<container_api::stats::GuestMemory>,
    pub network: Option<container_api::stats::NetworkUsage>,
}

/// A running machine's guest rebooted itself, which ends its VM (QEMU runs with
/// `-no-reboot`).
#[derive(Debug, Clone)]
pub struct Reboot {
    pub name: String,
    /// When the VM's end was seen.
    pub at: std::time::Instant,
}
