//! The core's [`Vms`] port bound to the VM runtime: machine records in, VM specs out. This is
//! where a machine's kernel is chosen (its own, else config's, else the installed one), its
//! network plan is computed (lease, tap, guest configuration) and its shares are given their
//! owner, so the runtime needs to know nothing of machines, the network or the core.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use container_agent_proto as proto;
use container_api::ApiError;
use container_api::machine::{HomeMount, MachineState};
use tokio::io::AsyncRead;

use crate::config::Config;
use crate::core::ServiceOptions;
use crate::core::ports::{
    BootSpec, ClientStream, Death, ExecSpec, ExecUser, PortsPlan, Reboot, SshAgentForward, VmStats,
    Vms,
};
use crate::network::Network;
use crate::runtime::{
    self, HelperPaths, Kernel, NetDevice, PortForwards, PortPolicy, Runtime, RuntimeError,
    RuntimeOptions, ShareSpec, SshAgentTarget, SshAgents, VmSpec, console, disk, kernel,
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
        vm_users: r.vm_users,
        tcg_translation_cache: r.tcg_translation_cache,
        boot_timeout: r.boot_timeout,
        virtiofsd_args: r.virtiofsd_args.clone(),
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
    let deaths = tokio::sync::broadcast::channel(16).0;
    let mut from_runtime = runtime.deaths();
    let to_core = deaths.clone();
    tokio::spawn(async move {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            match from_runtime.recv().await {
                Ok(d) => {
                    let _ = to_core.send(Death {
                        name: d.name,
                        clean: d.clean,
                    });
                }
                Err(RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "missed ends of machines")
                }
                Err(RecvError::Closed) => return,
            }
        }
    });
    let forwards = PortForwards::new(runtime.clone());
    let service = ServiceVms {
        runtime,
        root: options.root.clone(),
        config: config.clone(),
        network,
        reboots,
        ssh_agents: Arc::default(),
        forwards,
        deaths,
        cpu_samples: Default::default(),
    };
    service.runtime.adopt_all(&service.machines());
    runtime::reclaim::spawn(
        service.runtime.clone(),
        runtime::reclaim::Policy {
            idle_after: config.memory.reclaim_idle_after,
            pressure: config.memory.reclaim_pressure,
        },
    );
    Ok(Arc::new(service))
}

async fn blocking(
    f: impl FnOnce() -> Result<(), RuntimeError> + Send + 'static,
) -> Result<(), ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(ApiError::from)
}

/// Keeps a stopped disk's chain of shared layers bounded: past [`disk::MAX_CHAIN`], what
/// the layers hold is copied into the disk itself and it sits on the base disk again (the
/// only step of a clone or snapshot whose cost is the data's, once per that many).
fn flatten_if_deep(disk: &Path, layers: &Path) -> Result<(), RuntimeError> {
    let chain = disk::layers_of(disk, layers)?;
    if chain.len() < disk::MAX_CHAIN {
        return Ok(());
    }
    let deepest = chain.last().expect("a deep chain has layers");
    match disk::header(deepest)?.backing {
        Some(base) => {
            tracing::info!(disk = %disk.display(), depth = chain.len(), "flattening a deep disk chain");
            disk::flatten(disk, &base)
        }
        None => Ok(()),
    }
}

/// The runtime as the core's [`Vms`] port: machine records in, VM specs out.
#[derive(Debug)]
pub struct ServiceVms {
    runtime: Runtime,
    root: PathBuf,
    config: Config,
    network: Arc<Network>,
    reboots: tokio::sync::broadcast::Sender<Reboot>,
    deaths: tokio::sync::broadcast::Sender<Death>,
    /// The SSH agents exec sessions forward into their machines.
    ssh_agents: Arc<SshAgents>,
    /// The host ports forwarded to running machines.
    forwards: PortForwards,
    /// The last CPU time read of each running VM, and when: a rate needs two reads.
    cpu_samples: std::sync::Mutex<HashMap<String, (u64, Instant)>>,
}

/// The caller's agent as the runtime connects to it: with the caller's groups too (those
/// the host's group database gives them, as a login would), so a socket shared with a group
/// of theirs is reached as by their own processes.
fn ssh_agent_target(forward: SshAgentForward) -> SshAgentTarget {
    let gid = nix::unistd::Gid::from_raw(forward.gid);
    let groups = nix::unistd::User::from_uid(forward.uid.into())
        .ok()
        .flatten()
        .and_then(|u| std::ffi::CString::new(u.name).ok())
        .and_then(|name| nix::unistd::getgrouplist(&name, gid).ok())
        .map(|groups| groups.into_iter().map(|g| g.as_raw()).collect())
        .unwrap_or_else(|| vec![forward.gid]);
    SshAgentTarget {
        path: PathBuf::from(forward.path),
        uid: forward.uid,
        gid: forward.gid,
        groups,
    }
}

/// How long the guest's agent has to answer a stats request: a busy guest under software
/// emulation is slow, and a sample without the guest's figures beats a slow `inspect`.
const GUEST_STATS_TIMEOUT: Duration = Duration::from_secs(2);
/// Two CPU reads closer than this make too noisy a rate; further apart than the longest,
/// too stale a one.
const CPU_WINDOW: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(60);

impl ServiceVms {
    fn machines(&self) -> PathBuf {
        self.root.join("machines")
    }

    /// The shared read-only disk layers of clones and snapshots.
    fn layers(&self) -> PathBuf {
        self.root.join("layers")
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
                instance_id: r.instance.clone().unwrap_or_default(),
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

    /// The VM's CPU use in percent of one core since the previous read, and this read kept
    /// for the next one (unless the previous one is too recent to replace).
    fn cpu_percent(&self, name: &str, cpu_time_ns: u64) -> Option<f64> {
        let now = Instant::now();
        let mut samples = self.cpu_samples.lock().unwrap_or_else(|p| p.into_inner());
        let previous = samples.get(name).copied();
        if previous.is_some_and(|(_, at)| now - at < *CPU_WINDOW.start()) {
            return None;
        }
        samples.insert(name.to_string(), (cpu_time_ns, now));
        let (ns, at) = previous.filter(|(_, at)| CPU_WINDOW.contains(&(now - *at)))?;
        Some(cpu_time_ns.saturating_sub(ns) as f64 * 100.0 / (now - at).as_nanos() as f64)
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
    async fn freeze_disk(&self, name: &str, disk: &Path) -> Result<PathBuf, ApiError> {
        let layers = self.layers();
        if self.runtime.status(name) == MachineState::Stopped {
            let d = disk.to_path_buf();
            blocking(move || flatten_if_deep(&d, &layers)).await?;
        }
        let layer = disk::new_layer(&self.layers());
        self.runtime.freeze_disk(name, disk, &layer).await?;
        Ok(layer)
    }
    async fn disk_from_layer(&self, layer: &Path, disk: &Path) -> Result<(), ApiError> {
        let (layer, disk, layers) = (layer.to_path_buf(), disk.to_path_buf(), self.layers());
        blocking(move || {
            let size = disk::header(&layer)?.size;
            let next = disk.with_extension("qcow2.next");
            let _ = std::fs::remove_file(&next);
            disk::overlay_on_layer(&layer, &next, size)?;
            flatten_if_deep(&next, &layers)?;
            std::fs::rename(&next, &disk).map_err(RuntimeError::io("replacing the disk", &disk))
        })
        .await
    }
    async fn collect_layers(&self, roots: Vec<PathBuf>) -> Result<(), ApiError> {
        let layers = self.layers();
        blocking(move || {
            let removed = disk::collect(&layers, &roots)?;
            if removed > 0 {
                tracing::info!(removed, "shared disk layers no longer used were deleted");
            }
            Ok(())
        })
        .await
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
        // The host ports close as the stop begins, not a tick after it ends.
        self.forwards.set(name, None);
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
    fn deaths(&self) -> tokio::sync::broadcast::Receiver<Death> {
        self.deaths.subscribe()
    }
    fn started(&self, name: &str) -> Option<chrono::DateTime<chrono::Utc>> {
        self.runtime.started(name)
    }
    async fn exec(
        &self,
        name: &str,
        spec: ExecSpec,
        mut client: Box<dyn ClientStream>,
    ) -> Result<(), ApiError> {
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
        // Held until the session ends: the machine has the agent while the process runs.
        let forwarding = match spec.ssh_agent {
            Some(forward) => match self
                .runtime
                .guest_ports(name)
                .and_then(|ports| self.ssh_agents.forward(&ports, ssh_agent_target(forward)))
            {
                Ok(f) => Some(f),
                Err(e) => {
                    let e = ApiError::from(e);
                    let _ = container_api::session::Frame::Error(e.clone())
                        .write(&mut client)
                        .await;
                    return Err(e);
                }
            },
            None => None,
        };
        let mut env = spec.env;
        if forwarding.is_some() && !env.iter().any(|e| e.starts_with("SSH_AUTH_SOCK=")) {
            env.push(format!("SSH_AUTH_SOCK={}", proto::SSH_AGENT_SOCKET));
        }
        let (uid, gid, user) = match spec.user {
            ExecUser::Ids { uid, gid } => (Some(uid), gid, None),
            ExecUser::Name(n) => (None, None, Some(n)),
        };
        let request = proto::ExecRequest {
            argv: spec.argv,
            arg0: spec.arg0,
            env,
            cwd: spec.cwd,
            uid,
            gid,
            groups: spec.groups,
            user,
            tty: spec.tty,
            rows: spec.rows,
            cols: spec.cols,
            ssh_agent: forwarding.is_some(),
        };
        let ended = runtime::exec(&vsock, request, spec.detach, client).await;
        drop(forwarding);
        ended.map_err(ApiError::from)
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
    async fn connect(&self, name: &str, port: u16) -> Result<Box<dyn ClientStream>, ApiError> {
        let stream = runtime::connect(&self.running(name)?, port).await?;
        Ok(Box::new(stream))
    }
    async fn copy_root(&self, name: &str) -> Result<Box<dyn AsyncRead + Send + Unpin>, ApiError> {
        runtime::copy_root(&self.running(name)?)
            .await
            .map_err(ApiError::from)
    }
    fn log_path(&self, name: &str, boot: bool) -> PathBuf {
        console::log_path(&self.machines().join(name), boot)
    }
    async fn stats(&self, name: &str) -> Option<VmStats> {
        let runtime = self.runtime.clone();
        let id = name.to_string();
        let usage = tokio::task::spawn_blocking(move || runtime.usage(&id))
            .await
            .ok()
            .flatten();
        let Some(usage) = usage else {
            self.cpu_samples
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(name);
            return None;
        };
        let guest = async {
            let socket = self.running(name).ok()?;
            let ask = async {
                proto::client::AgentClient::connect(&socket, proto::PORT)
                    .await?
                    .stats()
                    .await
            };
            match tokio::time::timeout(GUEST_STATS_TIMEOUT, ask).await {
                Ok(Ok(m)) => Some(container_api::stats::GuestMemory {
                    total: m.total,
                    used: m.used,
                    cache: m.cache,
                    free: m.free,
                    available: m.available,
                }),
                Ok(Err(e)) => {
                    tracing::debug!(machine = %name, error = %e, "no guest memory figures");
                    None
                }
                Err(_) => None,
            }
        };
        let guest_memory = guest.await;
        let cpu_time_ns = usage.processes.iter().map(|p| p.cpu_time_ns).sum();
        Some(VmStats {
            cpu_time_ns,
            cpu_percent: self.cpu_percent(name, cpu_time_ns),
            host_memory: container_api::stats::HostMemory {
                rss: usage.processes.iter().map(|p| p.rss).sum(),
                pss: usage.processes.iter().map(|p| p.pss).sum(),
                processes: usage.processes,
            },
            guest_memory,
            network: usage.network,
        })
    }

    fn forward_ports(&self, name: &str, plan: Option<PortsPlan>) {
        let policy = plan.map(|p| PortPolicy {
            watch: p.watch,
            publish: p.publish,
            address: self.config.network.forward_address,
        });
        self.forwards.set(name, policy);
    }

    fn ports(&self, name: &str) -> Vec<container_api::ports::PortForward> {
        self.forwards.list(name)
    }
}
