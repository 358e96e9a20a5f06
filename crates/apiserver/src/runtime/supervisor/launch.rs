//! Starting a VM: the initramfs with the boot config, the runtime directory and its sockets,
//! the helpers and the VMM spawned and recorded in `run.json`, then the wait for the agent's
//! readiness report, with a retry when the guest stays silent.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use container_agent_proto as proto;
use container_agent_proto::client::ReadyListener;
use container_api::machine::MachineState;
use tokio::sync::watch;

use super::{
    CONTROL_SOCKET, RUN_FILE, RunState, Runtime, VSOCK_SOCKET, Vm, clear_stop_reason, learn_boot,
    record_stop_reason, sync_clock,
};
use crate::fsutil;
use crate::runtime::helpers::{self, VHOST_DEVICE_VSOCK, VIRTIOFSD};
use crate::runtime::process::ProcessId;
use crate::runtime::vmm::Launch;
use crate::runtime::{RunningVm, RuntimeError, VmSpec, console, initramfs};

const HELPER_LOG: &str = "helpers.log";
/// Every process a start spawned, in the runtime directory, written as each one is.
pub(super) const SPAWNED_FILE: &str = "spawned.json";
/// Longest Unix socket path (sun_path holds 108 bytes with the terminating NUL).
const MAX_SOCKET_PATH: usize = 107;
/// How long a guest may print nothing before its boot is retried.
const SILENCE_LIMIT: Duration = Duration::from_secs(20);
/// Boot attempts when the guest stays silent.
const ATTEMPTS: u32 = 3;

/// Why one boot attempt failed.
enum Attempt {
    /// Nothing on the console: worth another try.
    Silent,
    Failed(RuntimeError),
}

impl From<RuntimeError> for Attempt {
    fn from(e: RuntimeError) -> Self {
        Attempt::Failed(e)
    }
}

/// The programs a start runs besides the VMM.
struct Binaries {
    agent: PathBuf,
    vhost_device_vsock: PathBuf,
    /// Only when the VM has shares.
    virtiofsd: Option<PathBuf>,
}

/// Where a VM's sockets and files go, in its runtime directory (short, so socket paths
/// stay under the limit).
struct RunPaths {
    dir: PathBuf,
    /// vhost-device-vsock's vhost-user socket, for the VMM.
    vhost_user: PathBuf,
    /// The hybrid-vsock socket, for the host's sessions with the agent.
    vsock: PathBuf,
    /// Where the agent reports ready.
    ready: PathBuf,
    control: PathBuf,
    fs_dir: PathBuf,
    /// (tag, vhost-user socket of its virtiofsd), one per share.
    shares: Vec<(String, PathBuf)>,
    initrd: PathBuf,
}

impl RunPaths {
    fn new(dir: PathBuf, spec: &VmSpec) -> Self {
        let fs_dir = dir.join("fs");
        let vsock = dir.join(VSOCK_SOCKET);
        RunPaths {
            vhost_user: dir.join("vhu.sock"),
            ready: ReadyListener::path_for(&vsock, proto::READY_PORT),
            vsock,
            control: dir.join(CONTROL_SOCKET),
            shares: spec
                .shares
                .iter()
                .map(|s| (s.tag.clone(), fs_dir.join(format!("{}.sock", s.tag))))
                .collect(),
            fs_dir,
            initrd: dir.join("initrd.img"),
            dir,
        }
    }

    /// Every socket's path fits in a Unix socket address.
    fn check(&self) -> Result<(), RuntimeError> {
        let sockets = [&self.vhost_user, &self.vsock, &self.ready, &self.control];
        for p in sockets
            .into_iter()
            .chain(self.shares.iter().map(|(_, p)| p))
        {
            if p.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(RuntimeError::SocketPathTooLong(p.to_path_buf()));
            }
        }
        Ok(())
    }
}

impl Runtime {
    /// Boots a VM and waits until its agent answers. Needs a tokio runtime.
    ///
    /// Retries when the guest stays silent: under software emulation a guest kernel
    /// occasionally stalls before its first console line; a fresh start gets past it.
    pub async fn start(&self, spec: VmSpec) -> Result<RunningVm, RuntimeError> {
        if let Some(vm) = self.get(&spec.id) {
            // A VM adopted in the middle of its boot finishes it (or is forced off) first.
            if vm.get() == MachineState::Starting && vm.adopted {
                let mut rx = vm.state.subscribe();
                let _ = rx.wait_for(|s| *s != MachineState::Starting).await;
            }
            match vm.get() {
                MachineState::Stopped => {}
                MachineState::Running => return Ok(vm.info()),
                _ => return Err(RuntimeError::AlreadyRunning(spec.id)),
            }
        }
        let _launching = Launching::new(self, &spec.id);
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.start_once(&spec, attempt < ATTEMPTS).await {
                Ok(vm) => return Ok(vm),
                Err(Attempt::Failed(e)) => return Err(e),
                Err(Attempt::Silent) => {
                    tracing::warn!(machine = %spec.id, attempt, "the guest printed nothing; restarting the VM");
                }
            }
        }
    }

    async fn start_once(&self, spec: &VmSpec, may_retry: bool) -> Result<RunningVm, Attempt> {
        let this = self.clone();
        let mut launch_spec = spec.clone();
        if let Some(net) = &mut launch_spec.net {
            net.tap = self
                .network(&spec.id)?
                .attach(&spec.id)
                .await
                .map_err(|source| RuntimeError::Tap {
                    machine: spec.id.clone(),
                    source,
                })?;
        }
        let launched = tokio::task::spawn_blocking(move || this.launch(&launch_spec))
            .await
            .map_err(|e| RuntimeError::Io {
                what: "starting the VM of",
                path: spec.machine_dir.clone(),
                source: std::io::Error::other(e.to_string()),
            })
            .and_then(|r| r);
        let (vm, ready) = match launched {
            Ok(launched) => launched,
            Err(e) => {
                // No VMM runs, so no watcher will remove the tap.
                if spec.net.is_some()
                    && let Some(network) = &self.0.options.network
                {
                    network.detach(&spec.id).await;
                }
                return Err(e.into());
            }
        };
        let vm = Arc::new(vm);
        self.vms().insert(spec.id.clone(), vm.clone());
        self.watch(vm.clone());

        // The agent says when it is ready; nothing connects to it before (see
        // `ReadyListener`). Meanwhile the VM may exit, or stay silent.
        let console = console::console_path(&spec.machine_dir);
        let launched = Instant::now();
        let deadline = launched + self.0.options.boot_timeout;
        let answered = self.await_agent(&vm, &ready, deadline);
        tokio::pin!(answered);
        let mut check = tokio::time::interval(Duration::from_millis(100));
        let readiness = loop {
            tokio::select! {
                answered = &mut answered => match answered {
                    Ok(readiness) => break readiness,
                    Err(source) => {
                        record_stop_reason(&spec.machine_dir, &format!(
                            "the guest agent did not answer within {} s of the start ({source}); forced off",
                            self.0.options.boot_timeout.as_secs()
                        ));
                        self.force_stop(&vm).await;
                        return Err(Attempt::Failed(RuntimeError::AgentTimeout {
                            secs: self.0.options.boot_timeout.as_secs(),
                            tail: console::tail(&console, 20),
                            log: console,
                            source,
                        }));
                    }
                },
                _ = check.tick() => {
                    if vm.get() == MachineState::Stopped {
                        record_stop_reason(&spec.machine_dir, "the VM exited during its boot");
                        return Err(Attempt::Failed(RuntimeError::ExitedDuringBoot {
                            tail: console::tail(&console, 20),
                            log: console,
                        }));
                    }
                    if may_retry
                        && launched.elapsed() > SILENCE_LIMIT
                        && std::fs::metadata(&console).map(|m| m.len()).unwrap_or(0) == 0
                    {
                        self.force_stop(&vm).await;
                        return Err(Attempt::Silent);
                    }
                }
            }
        };
        learn_boot(&vm, readiness).await;
        console::write_boot_log(&spec.machine_dir);
        // The boot config carried the host's time at launch; the boot took a while since.
        sync_clock(&spec.id, &vm.agent_socket()).await;
        // A stop that raced with the boot wins.
        vm.state.send_if_modified(|s| {
            let starting = *s == MachineState::Starting;
            if starting {
                *s = MachineState::Running;
            }
            starting
        });
        Ok(vm.info())
    }

    /// Builds the initramfs, spawns the helpers and the VMM, records them; the VM and where
    /// its agent will report ready. Blocking.
    fn launch(&self, spec: &VmSpec) -> Result<(Vm, ReadyListener), RuntimeError> {
        let o = &self.0.options;
        let bins = Binaries {
            agent: helpers::find_binary(helpers::AGENT, o.helpers.agent.as_deref())?,
            vhost_device_vsock: helpers::find_binary(
                VHOST_DEVICE_VSOCK,
                o.helpers.vhost_device_vsock.as_deref(),
            )?,
            virtiofsd: match spec.shares.is_empty() {
                true => None,
                false => Some(helpers::find_binary(
                    VIRTIOFSD,
                    o.helpers.virtiofsd.as_deref(),
                )?),
            },
        };
        let initrd = initramfs::build(&o.root.join("initramfs"), &spec.kernel, &bins.agent)?;

        let paths = RunPaths::new(self.run_dir(&spec.id), spec);
        let _ = std::fs::remove_dir_all(&paths.dir);
        std::fs::create_dir_all(&paths.dir).map_err(RuntimeError::io("creating", &paths.dir))?;
        paths.check()?;
        let boot = boot_config(spec, initrd.modules.clone());
        let boot_json = serde_json::to_vec(&boot).map_err(|e| RuntimeError::Io {
            what: "encoding the boot config for",
            path: paths.initrd.clone(),
            source: std::io::Error::other(e),
        })?;
        initramfs::with_boot_config(&initrd.path, &boot_json, &paths.initrd)?;

        let ready = ReadyListener::bind(&paths.vsock, proto::READY_PORT)
            .map_err(RuntimeError::io("listening on", &paths.ready))?;
        let log = spec.machine_dir.join(HELPER_LOG);
        let _ = std::fs::remove_file(&log);
        console::reset(&spec.machine_dir);
        clear_stop_reason(&spec.machine_dir);
        let mut started = Started {
            record: paths.dir.join(SPAWNED_FILE),
            ..Default::default()
        };
        let spawned = self
            .spawn_helpers(spec, &bins, &paths, &log, &mut started)
            .and_then(|()| self.spawn_vmm(spec, &paths, &log, &mut started));
        match spawned {
            Ok(run) => Ok((
                Vm {
                    machine_dir: spec.machine_dir.clone(),
                    run,
                    state: watch::Sender::new(MachineState::Starting),
                    adopted: false,
                    responsive: AtomicBool::new(true),
                    booted: AtomicBool::new(false),
                    children: Mutex::new(std::mem::take(&mut started.children)),
                },
                ready,
            )),
            Err(e) => {
                started.kill_all();
                let _ = std::fs::remove_dir_all(&paths.dir);
                Err(e)
            }
        }
    }

    /// Spawns vhost-device-vsock, then one virtiofsd per share, each waited for until its
    /// socket exists.
    fn spawn_helpers(
        &self,
        spec: &VmSpec,
        bins: &Binaries,
        paths: &RunPaths,
        log: &Path,
        started: &mut Started,
    ) -> Result<(), RuntimeError> {
        let vsock =
            helpers::vhost_device_vsock(&bins.vhost_device_vsock, &paths.vhost_user, &paths.vsock);
        started.helper(helpers::spawn(vsock, VHOST_DEVICE_VSOCK, log)?)?;
        helpers::wait_for_socket(&paths.vhost_user, started.last(), VHOST_DEVICE_VSOCK, log)?;

        let Some(virtiofsd) = &bins.virtiofsd else {
            return Ok(());
        };
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&paths.fs_dir)
                .map_err(RuntimeError::io("creating", &paths.fs_dir))?;
        }
        for (share, (_, socket)) in spec.shares.iter().zip(&paths.shares) {
            // The service binds each share's socket in its own directory and hands it to
            // virtiofsd (which runs as the share's owner) as a descriptor; QEMU connects
            // to it once virtiofsd serves it, and meanwhile waits in the listen backlog.
            let listener = std::os::unix::net::UnixListener::bind(socket)
                .map_err(RuntimeError::io("binding", socket))?;
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
                    .map_err(RuntimeError::io("securing", socket))?;
            }
            let fs = helpers::virtiofsd(virtiofsd, share, listener.into());
            started.helper(helpers::spawn(fs, VIRTIOFSD, log)?)?;
        }
        Ok(())
    }

    /// Spawns the VMM and records the VM in `run.json`, in the machine directory and in the
    /// runtime directory.
    fn spawn_vmm(
        &self,
        spec: &VmSpec,
        paths: &RunPaths,
        log: &Path,
        started: &mut Started,
    ) -> Result<RunState, RuntimeError> {
        let console = console::console_path(&spec.machine_dir);
        let launch = Launch {
            cpus: spec.cpus,
            memory_mib: (spec.memory_bytes >> 20).max(64),
            kernel: &spec.kernel.vmlinuz,
            initrd: &paths.initrd,
            disk: &spec.disk,
            console: &console,
            control: &paths.control,
            vsock: &paths.vhost_user,
            shares: &paths.shares,
            net: spec.net.as_ref(),
        };
        let vmm = helpers::spawn(self.0.vmm.command(&launch), helpers::QEMU, log)?;
        let qemu = ProcessId::of(vmm.id()).unwrap_or(ProcessId(vmm.id() as i32, 0));
        started.children.push(vmm);
        started.spawned(qemu)?;
        let run = RunState {
            id: spec.id.clone(),
            qemu,
            helpers: started.helpers.clone(),
            run_dir: paths.dir.clone(),
            started: chrono::Utc::now(),
            tap: spec.net.as_ref().map(|n| n.tap.clone()),
            ready: false,
            stop_by: None,
        };
        for run_file in [spec.machine_dir.join(RUN_FILE), paths.dir.join(RUN_FILE)] {
            fsutil::write_json(&run_file, &run).map_err(RuntimeError::io("writing", &run_file))?;
        }
        Ok(run)
    }

    /// The per-VM runtime directory: short, so socket paths stay under the limit.
    fn run_dir(&self, id: &str) -> PathBuf {
        let short = hex::encode(&<sha2::Sha256 as sha2::Digest>::digest(id.as_bytes())[..6]);
        self.0.options.run_dir.join("vm").join(short)
    }
}

/// The agent's boot config: the spec's, with what the runtime decides filled in.
fn boot_config(spec: &VmSpec, modules: Vec<String>) -> proto::BootConfig {
    let mut boot = spec.boot.clone();
    boot.version = proto::VERSION;
    boot.vsock_port = proto::PORT;
    boot.ready_port = proto::READY_PORT;
    boot.modules = modules;
    boot.shares = spec
        .shares
        .iter()
        .map(|s| proto::Share {
            tag: s.tag.clone(),
            guest_path: s.guest_path.clone(),
            read_only: s.read_only,
        })
        .collect();
    boot.time_unix_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    boot
}

/// Marks a start in progress until dropped (the start returned or was cancelled).
struct Launching<'a> {
    runtime: &'a Runtime,
    id: String,
}

impl<'a> Launching<'a> {
    fn new(runtime: &'a Runtime, id: &str) -> Self {
        let mut launching = runtime
            .0
            .launching
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        launching.insert(id.to_string());
        Launching {
            runtime,
            id: id.to_string(),
        }
    }
}

impl Drop for Launching<'_> {
    fn drop(&mut self) {
        let launching = &self.runtime.0.launching;
        let mut launching = launching.lock().unwrap_or_else(|p| p.into_inner());
        launching.remove(&self.id);
    }
}

/// Processes spawned by a start in progress, killed if the start fails. Each is recorded
/// in the runtime directory as soon as it is spawned ([`SPAWNED_FILE`]), so a service killed
/// before `run.json` is written leaves nothing the next one cannot end.
#[derive(Default)]
struct Started {
    helpers: Vec<ProcessId>,
    children: Vec<std::process::Child>,
    /// Where every process spawned so far is recorded.
    record: PathBuf,
    all: Vec<ProcessId>,
}

impl Started {
    fn helper(&mut self, child: std::process::Child) -> Result<(), RuntimeError> {
        let id = ProcessId::of(child.id());
        self.children.push(child);
        if let Some(id) = id {
            self.helpers.push(id);
            self.spawned(id)?;
        }
        Ok(())
    }

    fn spawned(&mut self, id: ProcessId) -> Result<(), RuntimeError> {
        self.all.push(id);
        fsutil::write_json(&self.record, &self.all)
            .map_err(RuntimeError::io("writing", &self.record))
    }

    fn last(&mut self) -> &mut std::process::Child {
        self.children.last_mut().expect("a helper was just started")
    }

    fn kill_all(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
