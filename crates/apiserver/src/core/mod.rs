//! The service core. [`Request`] is the only way in: the HTTP layer and the tests build one
//! and call [`Core::handle`], which checks who is asking ([`Caller`]) and answers with a
//! [`Reply`] or an [`ApiError`] (the request bodies the HTTP layer parses are fuzzed on their
//! own, `fuzz/fuzz_targets/api_bodies.rs`). Operations that stream (pull progress, archives,
//! interactive sessions) carry their channel inside the request.

mod events;
mod images;
mod machines;
pub mod ports;
mod system;

use std::path::PathBuf;
use std::sync::Arc;

use container_api::image::{
    ImageDetail, ImageSummary, LoginRequest, PullEvent, RemoveReport, TagRequest,
};
use container_api::machine::{
    CreateRequest, Machine, RunRequest, SetReply, SetRequest, Snapshot, StopRequest,
};
use container_api::system::{Property, SystemStatus};
use container_api::{ApiError, ErrorKind};
use serde::Serialize;
use tokio::sync::Notify;

use crate::config::Config;
use crate::machines::MachineStore;
pub use events::EventStream;
pub use machines::{DEFAULT_STOP_TIMEOUT, parse_signal};
use ports::{ClientStream, Host, Images, Net, Platform, Vms};

/// A limit of `[limits]` reached: says which, and the key that raises it.
fn over_limit(what: String, key: &str) -> ApiError {
    ApiError::new(
        ErrorKind::PermissionDenied,
        format!(
            "{what}: the limit for a user (`limits.{key}` in the service's config.toml; root may raise it)"
        ),
    )
}

/// Who is calling, from the socket's peer credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

impl Caller {
    pub fn is_root(&self) -> bool {
        self.uid == 0
    }
}

/// Everything the core can be asked to do.
pub enum Request {
    SystemStatus,
    /// What the caller's images and machines take on disk (`system df`).
    DiskUsage,
    SystemProperties,
    /// Stop the service; machines keep running.
    SystemShutdown,
    /// The caller's machines' lifecycle events from now on (of `machine` alone if given).
    Events {
        machine: Option<String>,
    },
    KernelSet(container_api::system::KernelSetRequest),
    /// The caller's image names (and the system-wide ones); with `all` (root only), every
    /// user's.
    ImageList {
        all: bool,
    },
    ImageInspect(String),
    /// Pull; progress and the result go to `events`. `system`: name it system-wide (root).
    ImagePull {
        reference: String,
        system: bool,
        events: tokio::sync::mpsc::Sender<PullEvent>,
    },
    /// Push an image the caller sees to its registry; progress and the result go to
    /// `events`.
    ImagePush {
        reference: String,
        events: tokio::sync::mpsc::Sender<PullEvent>,
    },
    ImageTag(TagRequest),
    /// Load the images of an archive read from `archive`; `system`: name them system-wide
    /// (root).
    ImageLoad {
        archive: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
        system: bool,
    },
    /// An OCI-layout archive of these references.
    ImageSave(Vec<String>),
    /// Untag; `system`: a system-wide name (root).
    ImageRemove {
        reference: String,
        force: bool,
        system: bool,
    },
    /// Remove the caller's images no machine of theirs was created from (`all`; without it
    /// nothing: the store keeps no image without a name); `system`: the system-wide names
    /// (root).
    ImagePrune {
        all: bool,
        system: bool,
    },
    RegistryLogin(LoginRequest),
    RegistryLogout(String),
    MachineCreate(CreateRequest),
    MachineList,
    MachineInspect(String),
    /// The host ports forwarded to a machine.
    MachinePorts(String),
    /// What machines cost: the named ones, else the running ones (`all`: every one).
    MachineStats {
        names: Vec<String>,
        all: bool,
    },
    MachineStart(String),
    MachineStop(String, StopRequest),
    MachineDelete {
        name: String,
        force: bool,
    },
    MachineSet {
        name: String,
        settings: SetRequest,
    },
    MachineSetDefault(String),
    /// A new machine (`new`) from `name`'s disk and settings.
    MachineClone {
        name: String,
        new: String,
    },
    /// An image of `name`'s filesystem, named `image` among the caller's images.
    MachineCommit {
        name: String,
        image: String,
    },
    /// A stopped machine's new name.
    MachineRename {
        name: String,
        new: String,
    },
    SnapshotCreate {
        name: String,
        snapshot: Option<String>,
    },
    SnapshotList(String),
    SnapshotRestore {
        name: String,
        snapshot: String,
        force: bool,
    },
    SnapshotDelete {
        name: String,
        snapshot: String,
    },
    /// The console (or, with `boot`, the boot) log file of a machine.
    MachineLogs {
        name: String,
        boot: bool,
    },
    /// Unpack a tar stream at `path` in the machine.
    MachineCopyIn {
        name: String,
        path: String,
        tar: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    },
    /// A tar stream of `path` in the machine.
    MachineCopyOut {
        name: String,
        path: String,
    },
    /// Run a process; its frames are relayed on `client` (an upgraded connection).
    MachineExec {
        name: String,
        request: RunRequest,
        client: Box<dyn ClientStream>,
    },
    /// A connection to TCP `port` on the machine's loopback (booted if stopped), for the
    /// HTTP layer to splice with an upgraded connection (`ssh-proxy`).
    MachineConnect {
        name: String,
        port: u16,
    },
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Request::MachineExec { name, request, .. } => f
                .debug_struct("MachineExec")
                .field("name", name)
                .field("command", &request.command)
                .finish_non_exhaustive(),
            Request::MachineCreate(r) => f.debug_tuple("MachineCreate").field(&r.image).finish(),
            Request::SystemStatus => f.write_str("SystemStatus"),
            Request::DiskUsage => f.write_str("DiskUsage"),
            Request::SystemProperties => f.write_str("SystemProperties"),
            Request::SystemShutdown => f.write_str("SystemShutdown"),
            Request::Events { machine } => {
                f.debug_struct("Events").field("machine", machine).finish()
            }
            Request::KernelSet(k) => f.debug_tuple("KernelSet").field(k).finish(),
            Request::ImageList { all } => f.debug_struct("ImageList").field("all", all).finish(),
            Request::ImageInspect(r) => f.debug_tuple("ImageInspect").field(r).finish(),
            Request::ImagePull { reference, .. } => {
                f.debug_tuple("ImagePull").field(reference).finish()
            }
            Request::ImagePush { reference, .. } => {
                f.debug_tuple("ImagePush").field(reference).finish()
            }
            Request::ImageTag(t) => f.debug_tuple("ImageTag").field(t).finish(),
            Request::ImageLoad { system, .. } => {
                f.debug_struct("ImageLoad").field("system", system).finish()
            }
            Request::ImageSave(r) => f.debug_tuple("ImageSave").field(r).finish(),
            Request::ImageRemove {
                reference,
                force,
                system,
            } => f
                .debug_struct("ImageRemove")
                .field("reference", reference)
                .field("force", force)
                .field("system", system)
                .finish(),
            Request::ImagePrune { all, system } => f
                .debug_struct("ImagePrune")
                .field("all", all)
                .field("system", system)
                .finish(),
            Request::RegistryLogin(l) => f.debug_tuple("RegistryLogin").field(&l.server).finish(),
            Request::RegistryLogout(s) => f.debug_tuple("RegistryLogout").field(s).finish(),
            Request::MachineList => f.write_str("MachineList"),
            Request::MachineInspect(n) => f.debug_tuple("MachineInspect").field(n).finish(),
            Request::MachinePorts(n) => f.debug_tuple("MachinePorts").field(n).finish(),
            Request::MachineStats { names, all } => f
                .debug_struct("MachineStats")
                .field("names", names)
                .field("all", all)
                .finish(),
            Request::MachineStart(n) => f.debug_tuple("MachineStart").field(n).finish(),
            Request::MachineStop(n, _) => f.debug_tuple("MachineStop").field(n).finish(),
            Request::MachineDelete { name, force } => f
                .debug_struct("MachineDelete")
                .field("name", name)
                .field("force", force)
                .finish(),
            Request::MachineSet { name, .. } => f.debug_tuple("MachineSet").field(name).finish(),
            Request::MachineSetDefault(n) => f.debug_tuple("MachineSetDefault").field(n).finish(),
            Request::MachineClone { name, new } => f
                .debug_tuple("MachineClone")
                .field(name)
                .field(new)
                .finish(),
            Request::MachineCommit { name, image } => f
                .debug_tuple("MachineCommit")
                .field(name)
                .field(image)
                .finish(),
            Request::MachineRename { name, new } => f
                .debug_tuple("MachineRename")
                .field(name)
                .field(new)
                .finish(),
            Request::SnapshotCreate { name, snapshot } => f
                .debug_tuple("SnapshotCreate")
                .field(name)
                .field(snapshot)
                .finish(),
            Request::SnapshotList(n) => f.debug_tuple("SnapshotList").field(n).finish(),
            Request::SnapshotRestore {
                name,
                snapshot,
                force,
            } => f
                .debug_tuple("SnapshotRestore")
                .field(name)
                .field(snapshot)
                .field(force)
                .finish(),
            Request::SnapshotDelete { name, snapshot } => f
                .debug_tuple("SnapshotDelete")
                .field(name)
                .field(snapshot)
                .finish(),
            Request::MachineLogs { name, boot } => f
                .debug_struct("MachineLogs")
                .field("name", name)
                .field("boot", boot)
                .finish(),
            Request::MachineCopyIn { name, path, .. } => f
                .debug_tuple("MachineCopyIn")
                .field(name)
                .field(path)
                .finish(),
            Request::MachineCopyOut { name, path } => f
                .debug_tuple("MachineCopyOut")
                .field(name)
                .field(path)
                .finish(),
            Request::MachineConnect { name, port } => f
                .debug_tuple("MachineConnect")
                .field(name)
                .field(port)
                .finish(),
        }
    }
}

/// What the core answers; serialised as the variant's content.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Reply {
    Status(Box<SystemStatus>),
    DiskUsage(container_api::system::DiskUsage),
    Properties(Vec<Property>),
    Machine(Box<Machine>),
    Machines(Vec<Machine>),
    Snapshot(Box<Snapshot>),
    Snapshots(Vec<Snapshot>),
    Stats(Vec<container_api::stats::MachineStats>),
    Ports(Vec<container_api::ports::PortForward>),
    Set(Box<SetReply>),
    Kernel(Box<container_api::system::KernelInfo>),
    Images(Vec<ImageSummary>),
    Image(Box<ImageDetail>),
    ImageSummary(Box<ImageSummary>),
    Removed(RemoveReport),
    Object(serde_json::Value),
    /// A file the HTTP layer streams (logs); never serialised.
    #[serde(skip)]
    File(PathBuf),
    /// Events the HTTP layer streams, one JSON object a line; never serialised whole.
    #[serde(skip)]
    Events(EventStream),
    /// A byte stream the HTTP layer forwards (archives); never serialised.
    #[serde(skip)]
    Stream(ByteStream),
    /// A connection into a machine the HTTP layer splices with its client; never serialised.
    #[serde(skip)]
    Tunnel(Tunnel),
    Empty {},
}

/// A byte stream inside a [`Reply`].
pub struct ByteStream(pub Box<dyn tokio::io::AsyncRead + Send + Unpin>);

impl std::fmt::Debug for ByteStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ByteStream")
    }
}

/// A connection into a machine inside a [`Reply`].
pub struct Tunnel(pub Box<dyn ClientStream>);

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tunnel")
    }
}

/// Paths and settings the service was started with.
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    pub root: PathBuf,
    pub run_dir: PathBuf,
    pub socket: PathBuf,
}

/// The core's side effects, one port each (`ports`).
#[allow(missing_debug_implementations)]
pub struct Ports {
    pub images: Arc<dyn Images>,
    pub vms: Arc<dyn Vms>,
    pub net: Arc<dyn Net>,
    pub platform: Arc<dyn Platform>,
    pub host: Arc<dyn Host>,
}

struct State {
    options: ServiceOptions,
    config: Config,
    started: chrono::DateTime<chrono::Utc>,
    shutdown: Notify,
    machines: MachineStore,
    images: Arc<dyn Images>,
    vms: Arc<dyn Vms>,
    net: Arc<dyn Net>,
    platform: Arc<dyn Platform>,
    host: Arc<dyn Host>,
    locks: machines::Locks,
    /// Machines being created or cloned, and being booted, counted by the limit checks.
    creating: machines::Claims,
    booting: machines::Claims,
    reboots: machines::RebootPolicy,
    /// Held while shared disk layers are made, referenced or collected (`machines/copies`).
    disks: tokio::sync::Mutex<()>,
    events: events::Events,
    deaths: machines::Deaths,
}

/// The service core; cheap to clone.
#[derive(Clone)]
pub struct Core {
    state: Arc<State>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("root", &self.state.options.root)
            .finish_non_exhaustive()
    }
}

impl Core {
    /// Opens the stores under `options.root` and readies the core.
    pub fn open(options: ServiceOptions, config: Config, ports: Ports) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&options.root)?;
        std::fs::create_dir_all(&options.run_dir)?;
        let machines = MachineStore::open(&options.root)?;
        Ok(Self {
            state: Arc::new(State {
                options,
                config,
                started: chrono::Utc::now(),
                shutdown: Notify::new(),
                machines,
                images: ports.images,
                vms: ports.vms,
                net: ports.net,
                platform: ports.platform,
                host: ports.host,
                locks: Default::default(),
                creating: Default::default(),
                booting: Default::default(),
                reboots: Default::default(),
                disks: Default::default(),
                events: Default::default(),
                deaths: Default::default(),
            }),
        })
    }

    /// The single entry point.
    pub async fn handle(&self, caller: &Caller, request: Request) -> Result<Reply, ApiError> {
        tracing::debug!(uid = caller.uid, ?request, "request");
        let machine = |m: Machine| Reply::Machine(Box::new(m));
        match request {
            Request::SystemStatus => Ok(Reply::Status(Box::new(self.status().await))),
            Request::DiskUsage => self.disk_usage(caller).await.map(Reply::DiskUsage),
            Request::SystemProperties => {
                Ok(Reply::Properties(self.state.config.properties.clone()))
            }
            Request::SystemShutdown => {
                if !caller.is_root() {
                    return Err(ApiError::new(
                        ErrorKind::PermissionDenied,
                        "only root can stop the container service",
                    ));
                }
                self.state.shutdown.notify_waiters();
                Ok(Reply::Empty {})
            }
            Request::Events { machine } => Ok(Reply::Events(self.events(caller, machine))),
            Request::KernelSet(k) => self
                .kernel_set(caller, k)
                .await
                .map(|k| Reply::Kernel(Box::new(k))),
            Request::ImageList { all } => self.image_list(caller, all).await.map(Reply::Images),
            Request::ImageInspect(r) => self
                .image_inspect(caller, r)
                .await
                .map(|d| Reply::Image(Box::new(d))),
            Request::ImagePull {
                reference,
                system,
                events,
            } => {
                self.image_pull(caller, reference, system, events).await;
                Ok(Reply::Empty {})
            }
            Request::ImagePush { reference, events } => {
                self.image_push(caller, reference, events).await;
                Ok(Reply::Empty {})
            }
            Request::ImageTag(t) => self
                .image_tag(caller, t.source, t.target, t.system)
                .await
                .map(|s| Reply::ImageSummary(Box::new(s))),
            Request::ImageLoad { archive, system } => self
                .image_load(caller, archive, system)
                .await
                .map(Reply::Images),
            Request::ImageSave(refs) => self
                .image_save(caller, refs)
                .await
                .map(|s| Reply::Stream(ByteStream(s))),
            Request::ImageRemove {
                reference,
                force,
                system,
            } => self
                .image_remove(caller, reference, force, system)
                .await
                .map(Reply::Removed),
            Request::ImagePrune { all, system } => self
                .image_prune(caller, all, system)
                .await
                .map(Reply::Removed),
            Request::RegistryLogin(l) => self
                .registry_login(caller, l)
                .await
                .map(|()| Reply::Object(serde_json::json!({}))),
            Request::RegistryLogout(s) => self
                .registry_logout(caller, s)
                .await
                .map(|()| Reply::Object(serde_json::json!({}))),
            Request::MachineCreate(r) => self.machine_create(caller, r).await.map(machine),
            Request::MachineList => self.machine_list(caller).map(Reply::Machines),
            Request::MachineInspect(n) => self.machine_inspect(caller, &n).await.map(machine),
            Request::MachinePorts(n) => self.machine_ports(caller, &n).map(Reply::Ports),
            Request::MachineStats { names, all } => self
                .machine_stats(caller, &names, all)
                .await
                .map(Reply::Stats),
            Request::MachineStart(n) => self.machine_start(caller, &n).await.map(machine),
            Request::MachineStop(n, r) => self.machine_stop(caller, &n, r).await.map(machine),
            Request::MachineDelete { name, force } => {
                self.machine_delete(caller, &name, force).await.map(machine)
            }
            Request::MachineSet { name, settings } => self
                .machine_set(caller, &name, settings)
                .await
                .map(|r| Reply::Set(Box::new(r))),
            Request::MachineSetDefault(n) => {
                self.machine_set_default(caller, &n).await.map(machine)
            }
            Request::MachineClone { name, new } => {
                self.machine_clone(caller, &name, &new).await.map(machine)
            }
            Request::MachineCommit { name, image } => self
                .machine_commit(caller, &name, &image)
                .await
                .map(|s| Reply::ImageSummary(Box::new(s))),
            Request::MachineRename { name, new } => {
                self.machine_rename(caller, &name, &new).await.map(machine)
            }
            Request::SnapshotCreate { name, snapshot } => self
                .snapshot_create(caller, &name, snapshot)
                .await
                .map(|s| Reply::Snapshot(Box::new(s))),
            Request::SnapshotList(name) => self.snapshot_list(caller, &name).map(Reply::Snapshots),
            Request::SnapshotRestore {
                name,
                snapshot,
                force,
            } => self
                .snapshot_restore(caller, &name, &snapshot, force)
                .await
                .map(|s| Reply::Snapshot(Box::new(s))),
            Request::SnapshotDelete { name, snapshot } => self
                .snapshot_delete(caller, &name, &snapshot)
                .await
                .map(|s| Reply::Snapshot(Box::new(s))),
            Request::MachineLogs { name, boot } => {
                self.visible(caller, &name)?;
                Ok(Reply::File(self.state.vms.log_path(&name, boot)))
            }
            Request::MachineCopyIn { name, path, tar } => {
                self.machine_copy_in(caller, &name, &path, tar).await?;
                Ok(Reply::Empty {})
            }
            Request::MachineCopyOut { name, path } => self
                .machine_copy_out(caller, &name, &path)
                .await
                .map(|s| Reply::Stream(ByteStream(s))),
            Request::MachineExec {
                name,
                request,
                client,
            } => {
                self.machine_exec(caller, &name, request, client).await?;
                Ok(Reply::Empty {})
            }
            Request::MachineConnect { name, port } => self
                .machine_connect(caller, &name, port)
                .await
                .map(|t| Reply::Tunnel(Tunnel(t))),
        }
    }

    /// Resolves when a shutdown was requested through the API.
    pub async fn shutdown_requested(&self) {
        self.state.shutdown.notified().await
    }

    pub fn config(&self) -> &Config {
        &self.state.config
    }

    pub fn options(&self) -> &ServiceOptions {
        &self.state.options
    }
}

#[cfg(test)]
mod tests;
