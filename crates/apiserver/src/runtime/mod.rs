//! The VM runtime: machine disks (`disk`), the kernel (`kernel`) and the initramfs built
//! around the guest agent (`initramfs`), the VMM behind a small trait (`vmm`, `qemu`), the
//! helper processes (`helpers`), the serial console (`console`) and their supervision
//! (`supervisor`, whose [`Runtime`] is the door: start, stop, status, adopt).
//!
//! Invariants: every running VM has a `run.json` in its machine directory naming its VMM and
//! helpers by pid and start time; the VMM and helpers run in process groups of their own, so
//! the service can stop and start while machines run, and on start it adopts each machine
//! whose VMM still runs and cleans up after the others; whenever a VMM exits, its helpers
//! are killed and its runtime files removed.

pub mod console;
pub mod disk;
mod error;
pub mod helpers;
pub mod initramfs;
pub mod kernel;
pub mod process;
pub mod qemu;
mod session;
mod supervisor;
#[allow(unsafe_code)]
mod sys;
pub mod vmm;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use container_agent_proto as proto;
use container_api::ApiError;
use container_api::machine::{HomeMount, MachineState};
use container_api::system::KernelInfo;
use tokio::io::AsyncRead;

pub use error::RuntimeError;
pub use helpers::HelperPaths;
pub use kernel::Kernel;
pub use supervisor::Runtime;
pub use vmm::{NetDevice, TapError, TapPlumbing, Vmm};

use crate::config::{Config, Virtualization};
use crate::core::ServiceOptions;
use crate::core::ports::{BootSpec, ClientStream, ExecSpec, Reboot, Vms};
use crate::network::Network;

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
}

impl RuntimeOptions {
    pub fn new(root: impl Into<PathBuf>, run_dir: impl Into<PathBuf>) -> Self {
        RuntimeOptions {
            root: root.into(),
            run_dir: run_dir.into(),
            virtualization: Virtualization::Auto,
            helpers: HelperPaths::default(),
            boot_timeout: Duration::from_secs(180),
            network: None,
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

/// The runtime of a running service, with running machines adopted.
pub fn vms(
    options: &ServiceOptions,
    config: &Config,
    network: Arc<Network>,
) -> anyhow::Result<Arc<ServiceVms>> {
    let r = &config.runtime;
    let path = |p: &Option<String>| p.as_ref().map(PathBuf::from);
    let runtime = Runtime::new(RuntimeOptions {
        virtualization: r.virtualization,
        helpers: HelperPaths {
            qemu: path(&r.qemu),
            virtiofsd: path(&r.virtiofsd),
            vhost_device_vsock: path(&r.vhost_device_vsock),
            agent: path(&r.agent),
        },
        network: Some(network.clone()),
        ..RuntimeOptions::new(&options.root, &options.run_dir)
    });
    let service = ServiceVms {
        runtime,
        root: options.root.clone(),
        config: config.clone(),
        network,
    };
    service.runtime.adopt_all(&service.machines());
    Ok(Arc::new(service))
}

/// The runtime as the core's [`Vms`] port: machine records in, VM specs out.
#[derive(Debug)]
pub struct ServiceVms {
    runtime: Runtime,
    root: PathBuf,
    config: Config,
    network: Arc<Network>,
}

impl ServiceVms {
    fn machines(&self) -> PathBuf {
        self.root.join("machines")
    }

    /// The machine's own kernel, else the one in config, else the installed one.
    fn kernel_for(&self, custom: Option<&str>) -> Result<Kernel, RuntimeError> {
        let installed = kernel::current(&self.root);
        let configured = &self.config.kernel;
        match (custom, &configured.binary, &installed) {
            (Some(k), _, _) => Kernel::at(
                Path::new(k),
                installed
                    .as_ref()
                    .and_then(|i| i.modules.as_deref())
                    .map(Path::new),
            ),
            (None, Some(b), _) => {
                Kernel::at(Path::new(b), configured.modules.as_deref().map(Path::new))
            }
            (None, None, Some(info)) => Ok(Kernel::from_info(info)),
            (None, None, None) => Err(RuntimeError::NoKernel),
        }
    }

    fn spec(&self, spec: BootSpec) -> Result<VmSpec, RuntimeError> {
        let r = &spec.record;
        let user = &r.user;
        let (net, guest_net) = match r.network.as_str() {
            "none" => (None, None),
            _ => {
                let network_error = |e: crate::network::NetworkError| RuntimeError::Network {
                    machine: r.name.clone(),
                    source: Box::new(e),
                };
                let lease = self.network.lease(&r.name).map_err(network_error)?;
                let guest = self.network.guest_config(&r.name).map_err(network_error)?;
                let device = NetDevice {
                    tap: crate::network::tap_name(&r.name),
                    mac: lease.mac,
                };
                (Some(device), Some(guest))
            }
        };
        Ok(VmSpec {
            id: r.name.clone(),
            machine_dir: spec.machine_dir.clone(),
            kernel: self.kernel_for(r.kernel.as_deref())?,
            disk: spec.disk.clone(),
            cpus: r.cpus,
            memory_bytes: r.memory,
            shares: spec
                .shares
                .iter()
                .map(|s| ShareSpec {
                    tag: s.tag.clone(),
                    host_path: s.host_path.clone(),
                    guest_path: s.guest_path.clone(),
                    read_only: s.read_only,
                    owner_uid: r.owner_uid,
                    owner_gid: user.gid,
                })
                .collect(),
            boot: proto::BootConfig {
                version: proto::VERSION,
                machine_id: r.name.clone(),
                hostname: r.name.clone(),
                root_device: "/dev/vda".into(),
                grow_root: true,
                modules: Vec::new(),
                shares: Vec::new(),
                user: Some(proto::UserSpec {
                    name: user.name.clone(),
                    uid: user.uid,
                    gid: user.gid,
                    home: user.home.clone(),
                    shell: user.shell.clone(),
                }),
                home_mount: match r.home_mount {
                    HomeMount::Rw => proto::HomeMount::Rw,
                    HomeMount::Ro => proto::HomeMount::Ro,
                    HomeMount::None => proto::HomeMount::None,
                },
                network: guest_net,
                vsock_port: proto::PORT,
                ready_port: proto::READY_PORT,
                time_unix_ns: 0,
                init: vec!["/sbin/init".into()],
            },
            net,
        })
    }

    fn running(&self, name: &str) -> Result<PathBuf, ApiError> {
        Ok(self.runtime.agent_socket(name)?)
    }

    /// Startup cleanup of the network: frees the leases of machines that no longer exist,
    /// deletes taps no running machine owns, restores the host when nothing runs. Run after
    /// the running machines were adopted.
    pub async fn reconcile_network(&self) {
        let known: Vec<String> = std::fs::read_dir(self.machines())
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.path().join("machine.json").is_file())
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .collect()
            })
            .unwrap_or_default();
        let running: Vec<String> = known
            .iter()
            .filter(|n| self.runtime.status(n) != MachineState::Stopped)
            .cloned()
            .collect();
        match self.network.reconcile(&known, &running).await {
            Ok(r) if r != Default::default() => {
                tracing::info!(released = ?r.released, removed_taps = ?r.removed_taps, "network reconciled")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not reconcile the machine network"),
        }
    }
}

#[async_trait]
impl Vms for ServiceVms {
    async fn create_disk(&self, base: &Path, disk: &Path, size: u64) -> Result<(), ApiError> {
        let (base, disk) = (base.to_path_buf(), disk.to_path_buf());
        tokio::task::spawn_blocking(move || disk::create_overlay(&base, &disk, size))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?
            .map_err(ApiError::from)
    }
    async fn grow_disk(&self, disk: &Path, size: u64) -> Result<(), ApiError> {
        let disk = disk.to_path_buf();
        tokio::task::spawn_blocking(move || disk::grow(&disk, size))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?
            .map_err(ApiError::from)
    }
    fn disk_allocated(&self, disk: &Path) -> u64 {
        disk::allocated(disk)
    }
    async fn boot(&self, spec: BootSpec) -> Result<(), ApiError> {
        let spec = self.spec(spec)?;
        self.runtime.start(spec).await?;
        Ok(())
    }
    async fn shutdown(
        &self,
        name: &str,
        signal: Option<i32>,
        timeout: Duration,
    ) -> Result<(), ApiError> {
        Ok(self.runtime.stop(name, signal, timeout).await?)
    }
    fn state(&self, name: &str) -> MachineState {
        self.runtime.status(name)
    }
    fn reboots(&self) -> tokio::sync::broadcast::Receiver<Reboot> {
        self.runtime.reboots()
    }
    fn started(&self, name: &str) -> Option<chrono::DateTime<chrono::Utc>> {
        self.runtime.get(name).map(|v| v.run.started)
    }
    async fn exec(
        &self,
        name: &str,
        spec: ExecSpec,
        client: Box<dyn ClientStream>,
    ) -> Result<(), ApiError> {
        session::exec(&self.running(name)?, spec, client)
            .await
            .map_err(ApiError::from)
    }
    async fn copy_in(
        &self,
        name: &str,
        path: &str,
        tar: Box<dyn AsyncRead + Send + Unpin>,
    ) -> Result<(), ApiError> {
        session::copy_in(&self.running(name)?, path, tar)
            .await
            .map_err(ApiError::from)
    }
    async fn copy_out(
        &self,
        name: &str,
        path: &str,
    ) -> Result<Box<dyn AsyncRead + Send + Unpin>, ApiError> {
        session::copy_out(&self.running(name)?, path)
            .await
            .map_err(ApiError::from)
    }
    fn log_path(&self, name: &str, boot: bool) -> PathBuf {
        console::log_path(&self.machines().join(name), boot)
    }
}
