//! The core's [`Vms`] port bound to the VM runtime: machine records in, VM specs out. This is
//! where a machine's kernel is chosen (its own, else config's, else the installed one), its
//! network plan is computed (lease, tap, guest configuration) and its shares are given their
//! owner, so the runtime needs to know nothing of machines, the network or the core.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use container_agent_proto as proto;
use container_api::ApiError;
use container_api::machine::{HomeMount, MachineState};
use tokio::io::AsyncRead;

use crate::config::Config;
use crate::core::ServiceOptions;
use crate::core::ports::{BootSpec, ClientStream, ExecSpec, ExecUser, Reboot, Vms};
use crate::network::Network;
use crate::runtime::{
    self, HelperPaths, Kernel, NetDevice, Runtime, RuntimeError, RuntimeOptions, ShareSpec, VmSpec,
    console, disk, kernel,
};

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
        network: Some(Arc::new(super::net::Taps(network.clone()))),
        boot_timeout: r.boot_timeout,
        ..RuntimeOptions::new(&options.root, &options.run_dir)
    });
    // The core hears of reboots in its own terms; the forwarder ends with the runtime.
    let reboots = tokio::sync::broadcast::channel(16).0;
    let mut from_runtime = runtime.reboots();
    let to_core = reboots.clone();
    tokio::spawn(async move {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            match from_runtime.recv().await {
                Ok(r) => {
                    let _ = to_core.send(Reboot {
                        name: r.name,
                        at: r.at,
                    });
                }
                Err(RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "missed reboots of machines; they stay stopped")
                }
                Err(RecvError::Closed) => return,
            }
        }
    });
    let service = ServiceVms {
        runtime,
        root: options.root.clone(),
        config: config.clone(),
        network,
        reboots,
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
    reboots: tokio::sync::broadcast::Sender<Reboot>,
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
    fn stop_reason(&self, name: &str) -> Option<String> {
        runtime::stop_reason(&self.machines().join(name))
    }
    fn reboots(&self) -> tokio::sync::broadcast::Receiver<Reboot> {
        self.reboots.subscribe()
    }
    fn started(&self, name: &str) -> Option<chrono::DateTime<chrono::Utc>> {
        self.runtime.started(name)
    }
    async fn exec(
        &self,
        name: &str,
        spec: ExecSpec,
        client: Box<dyn ClientStream>,
    ) -> Result<(), ApiError> {
        let (uid, gid, user) = match spec.user {
            ExecUser::Ids { uid, gid } => (Some(uid), gid, None),
            ExecUser::Name(n) => (None, None, Some(n)),
        };
        let request = proto::ExecRequest {
            argv: spec.argv,
            arg0: spec.arg0,
            env: spec.env,
            cwd: spec.cwd,
            uid,
            gid,
            groups: spec.groups,
            user,
            tty: spec.tty,
            rows: spec.rows,
            cols: spec.cols,
        };
        let mut client = client;
        let vsock = match self.running(name) {
            Ok(vsock) => vsock,
            Err(e) => {
                // The connection is upgraded already: the error travels as a frame.
                let _ = container_api::session::Frame::Error(e.clone())
                    .write(&mut client)
                    .await;
                return Err(e);
            }
        };
        runtime::exec(&vsock, request, spec.detach, client)
            .await
            .map_err(ApiError::from)
    }
    async fn copy_in(
        &self,
        name: &str,
        path: &str,
        tar: Box<dyn AsyncRead + Send + Unpin>,
    ) -> Result<(), ApiError> {
        runtime::copy_in(&self.running(name)?, path, tar)
            .await
            .map_err(ApiError::from)
    }
    async fn copy_out(
        &self,
        name: &str,
        path: &str,
    ) -> Result<Box<dyn AsyncRead + Send + Unpin>, ApiError> {
        runtime::copy_out(&self.running(name)?, path)
            .await
            .map_err(ApiError::from)
    }
    fn log_path(&self, name: &str, boot: bool) -> PathBuf {
        console::log_path(&self.machines().join(name), boot)
    }
}
