//! Starting a VM: a uid of its own, the initramfs with the boot config, the runtime
//! directory and its sockets, the helpers and the VMM spawned (QEMU and vhost-device-vsock
//! as the VM's user, with only the descriptors the service opened for them) and recorded in
//! `run.json`, then the wait for the agent's readiness report, with a retry when the guest
//! stays silent.

use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use container_agent_proto as proto;
use container_agent_proto::client::ReadyListener;
use container_api::machine::MachineState;
use tokio::sync::watch;

use super::{
    AGENT_SOCKET, CONTROL_SOCKET, RUN_FILE, RunState, Runtime, VMM_DIR, VSOCK_SOCKET, Vm,
    clear_stop_reason, learn_boot, record_stop_reason, sync_clock,
};
use crate::fsutil;
use crate::runtime::helpers::{self, VHOST_DEVICE_VSOCK, VIRTIOFSD};
use crate::runtime::process::ProcessId;
use crate::runtime::vmm::{DiskLayer, Launch};
use crate::runtime::{RunningVm, RuntimeError, VmSpec, boot_image, console, disk, initramfs, sys};

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
    /// Root's.
    dir: PathBuf,
    /// The VM user's: the VMM's and vhost-device-vsock's working directory.
    vmm: PathBuf,
    /// vhost-device-vsock's vhost-user socket, for the VMM, relative to `vmm`.
    vhost_user: PathBuf,
    /// The hybrid-vsock socket, relative to `vmm`.
    vsock: PathBuf,
    /// Where the agent reports ready.
    ready: PathBuf,
    /// The service's link to the hybrid-vsock socket, for the host's sessions with the agent.
    agent: PathBuf,
    control: PathBuf,
    fs_dir: PathBuf,
    /// (tag, vhost-user socket of its virtiofsd), one per share.
    shares: Vec<(String, PathBuf)>,
    /// The initrd, relative to `vmm`.
    initrd: PathBuf,
}

impl RunPaths {
    fn new(dir: PathBuf, spec: &VmSpec) -> Self {
        let fs_dir = dir.join("fs");
        let vmm = dir.join(VMM_DIR);
        RunPaths {
            vhost_user: "vhu.sock".into(),
            vsock: VSOCK_SOCKET.into(),
            ready: ReadyListener::path_for(&vmm.join(VSOCK_SOCKET), proto::READY_PORT),
            agent: dir.join(AGENT_SOCKET),
            control: dir.join(CONTROL_SOCKET),
            shares: spec
                .shares
                .iter()
                .map(|s| (s.tag.clone(), fs_dir.join(format!("{}.sock", s.tag))))
                .collect(),
            fs_dir,
            initrd: "initrd.img".into(),
            vmm,
            dir,
        }
    }

    /// Every socket the service binds or connects to fits in a Unix socket address.
    fn check(&self) -> Result<(), RuntimeError> {
        let sockets = [&self.ready, &self.agent, &self.control];
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
        self.release_boot_files(&vm, spec);
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

    /// Pages the kernel and the initrd out of the booted VM's QEMU, in the background
    /// ([`boot_image::release`]).
    fn release_boot_files(&self, vm: &Vm, spec: &VmSpec) {
        let paths = RunPaths::new(vm.run.run_dir.clone(), spec);
        let initrd = paths.vmm.join(&paths.initrd);
        let cache = self.0.options.root.join("boot-kernels");
        let (qemu, kernel) = (vm.run.qemu, spec.kernel.clone());
        tokio::task::spawn_blocking(move || {
            let released = boot_image::prepare(&cache, &kernel)
                .map_err(std::io::Error::other)
                .and_then(|image| boot_image::release(qemu, &image, &initrd));
            match released {
                Ok(bytes) => tracing::debug!(bytes, "boot files paged out of the VMM"),
                Err(e) => tracing::debug!("boot files left mapped in the VMM: {e}"),
            }
        });
    }

    /// Reserves the VM's uid for as long as it runs and launches it. Blocking.
    fn launch(&self, spec: &VmSpec) -> Result<(Vm, ReadyListener), RuntimeError> {
        let uid = self.reserve_uid(&spec.id)?;
        self.launch_as(spec, uid)
            .inspect_err(|_| self.release_uid(&spec.id, uid))
    }

    /// Builds the initramfs, spawns the helpers and the VMM, records them; the VM and where
    /// its agent will report ready. Blocking.
    fn launch_as(&self, spec: &VmSpec, uid: u32) -> Result<(Vm, ReadyListener), RuntimeError> {
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
        private_dir(&paths.dir, None)?;
        private_dir(&paths.vmm, Some(uid))?;
        paths.check()?;
        let boot = boot_config(spec, initrd.modules.clone());
        let initrd_path = paths.vmm.join(&paths.initrd);
        let boot_json = serde_json::to_vec(&boot).map_err(|e| RuntimeError::Io {
            what: "encoding the boot config for",
            path: initrd_path.clone(),
            source: std::io::Error::other(e),
        })?;
        initramfs::with_boot_config(&initrd.path, &boot_json, &initrd_path)?;
        std::os::unix::fs::chown(&initrd_path, Some(uid), Some(uid))
            .map_err(RuntimeError::io("handing over", &initrd_path))?;

        let ready = listen_for_ready(&paths.dir, uid)?;
        let log = spec.machine_dir.join(HELPER_LOG);
        let _ = std::fs::remove_file(&log);
        console::reset(&spec.machine_dir);
        clear_stop_reason(&spec.machine_dir);
        let mut started = Started {
            record: paths.dir.join(SPAWNED_FILE),
            ..Default::default()
        };
        let spawned = self
            .spawn_helpers(spec, uid, &bins, &paths, &log, &mut started)
            .and_then(|shares| self.spawn_vmm(spec, uid, &paths, shares, &log, &mut started));
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

    /// Spawns vhost-device-vsock (as the VM's user), links its hybrid socket for the service
    /// once it is checked, then one virtiofsd per share; returns a connection to each
    /// virtiofsd for the VMM.
    fn spawn_helpers(
        &self,
        spec: &VmSpec,
        uid: u32,
        bins: &Binaries,
        paths: &RunPaths,
        log: &Path,
        started: &mut Started,
    ) -> Result<Vec<(String, OwnedFd)>, RuntimeError> {
        let mut vsock =
            helpers::vhost_device_vsock(&bins.vhost_device_vsock, &paths.vhost_user, &paths.vsock);
        vsock.current_dir(&paths.vmm);
        sys::drop_privileges(&mut vsock, uid, uid, Vec::new());
        started.helper(helpers::spawn(vsock, VHOST_DEVICE_VSOCK, log)?)?;
        for socket in [&paths.vhost_user, &paths.vsock] {
            let socket = paths.vmm.join(socket);
            helpers::wait_for_socket(&socket, started.last(), VHOST_DEVICE_VSOCK, log)?;
        }
        link_socket(&spec.id, &paths.vmm.join(&paths.vsock), uid, &paths.agent)?;

        let Some(virtiofsd) = &bins.virtiofsd else {
            return Ok(Vec::new());
        };
        private_dir(&paths.fs_dir, None)?;
        let mut connections = Vec::new();
        for (share, (tag, socket)) in spec.shares.iter().zip(&paths.shares) {
            // The service binds each share's socket in its own directory and hands it to
            // virtiofsd (which runs as the share's owner) as a descriptor, and connects to it
            // for QEMU, which gets the connection: it waits in the listen backlog until
            // virtiofsd serves it.
            let listener = std::os::unix::net::UnixListener::bind(socket)
                .map_err(RuntimeError::io("binding", socket))?;
            secure_socket(socket)?;
            let connection = std::os::unix::net::UnixStream::connect(socket)
                .map_err(RuntimeError::io("connecting to", socket))?;
            connections.push((tag.clone(), connection.into()));
            let fs = helpers::virtiofsd(
                virtiofsd,
                share,
                listener.into(),
                &self.0.options.virtiofsd_args,
            );
            started.helper(helpers::spawn(fs, VIRTIOFSD, log)?)?;
        }
        Ok(connections)
    }

    /// Spawns the VMM as the VM's user and records the VM in `run.json`, in the machine
    /// directory and in the runtime directory.
    fn spawn_vmm(
        &self,
        spec: &VmSpec,
        uid: u32,
        paths: &RunPaths,
        shares: Vec<(String, OwnedFd)>,
        log: &Path,
        started: &mut Started,
    ) -> Result<RunState, RuntimeError> {
        let console_path = console::console_path(&spec.machine_dir);
        let console = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&console_path)
            .map_err(RuntimeError::io("opening", &console_path))?;
        let _ = std::fs::remove_file(&paths.control);
        let control = std::os::unix::net::UnixListener::bind(&paths.control)
            .map_err(RuntimeError::io("binding", &paths.control))?;
        secure_socket(&paths.control)?;
        let net = match &spec.net {
            Some(net) => {
                let tap =
                    self.network(&spec.id)?
                        .open(&net.tap)
                        .map_err(|source| RuntimeError::Tap {
                            machine: spec.id.clone(),
                            source,
                        })?;
                Some((net.clone(), tap))
            }
            None => None,
        };
        // The VMM reads nothing of the service's by path: it is handed the kernel it boots.
        let image = boot_image::prepare(&self.0.options.root.join("boot-kernels"), &spec.kernel)?;
        let kernel =
            std::fs::File::open(&image).map_err(RuntimeError::io("opening the kernel", &image))?;
        let launch = Launch {
            cpus: spec.cpus,
            memory_mib: (spec.memory_bytes >> 20).max(64),
            kernel: kernel.into(),
            initrd: paths.initrd.clone(),
            disk: self.open_disk(&spec.disk)?,
            console: console.into(),
            control: control.into(),
            vsock: paths.vhost_user.clone(),
            shares,
            net,
        };
        let mut cmd = self.0.vmm.command(launch);
        cmd.current_dir(&paths.vmm);
        sys::drop_privileges(&mut cmd, uid, uid, self.vmm_groups());
        let vmm = helpers::spawn(cmd, helpers::QEMU, log)?;
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
            uid,
            ready: false,
            stop_by: None,
        };
        for run_file in [spec.machine_dir.join(RUN_FILE), paths.dir.join(RUN_FILE)] {
            fsutil::write_json(&run_file, &run).map_err(RuntimeError::io("writing", &run_file))?;
        }
        Ok(run)
    }

    /// Opens the machine disk's chain for the VMM: the disk read-write, what backs it
    /// read-only, each backing file checked to be in the image store (or the machine's own
    /// directory).
    fn open_disk(&self, path: &Path) -> Result<Vec<DiskLayer>, RuntimeError> {
        let mut allowed: Vec<PathBuf> = self
            .0
            .options
            .disk_bases
            .iter()
            .filter_map(|d| std::fs::canonicalize(d).ok())
            .collect();
        if let Some(dir) = path.parent().and_then(|d| std::fs::canonicalize(d).ok()) {
            allowed.push(dir);
        }
        let open = |p: &Path, write: bool| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(write)
                .open(p)
                .map(OwnedFd::from)
                .map_err(RuntimeError::io("opening", p))
        };
        disk::chain(path, &allowed)?
            .into_iter()
            .enumerate()
            .map(|(i, f)| {
                let top = i == 0;
                let mut files = vec![open(&f.path, false)?];
                if top {
                    files.insert(0, open(&f.path, true)?);
                }
                Ok(DiskLayer {
                    format: f.format,
                    files,
                    read_only: !top,
                })
            })
            .collect()
    }

    /// The VMM's one group besides its own: the KVM device's, when it uses KVM.
    fn vmm_groups(&self) -> Vec<u32> {
        use std::os::unix::fs::MetadataExt;
        match self.0.vmm.uses_kvm() {
            true => std::fs::metadata("/dev/kvm")
                .map(|m| vec![m.gid()])
                .unwrap_or_default(),
            false => Vec::new(),
        }
    }

    /// The per-VM runtime directory: short, so socket paths stay under the limit.
    fn run_dir(&self, id: &str) -> PathBuf {
        let short = hex::encode(&<sha2::Sha256 as sha2::Digest>::digest(id.as_bytes())[..6]);
        self.0.options.run_dir.join("vm").join(short)
    }
}

/// Makes a socket the service bound for its owner alone (0600), whatever the umask.
/// Listens where the agent of the VM whose runtime directory is `run_dir` reports ready:
/// beside the hybrid-vsock socket, in the VM user's `vmm/` (the runtime directory itself for
/// a VM `uid` 0 runs). vhost-device-vsock, as that user, connects to it when the agent reports.
pub(super) fn listen_for_ready(run_dir: &Path, uid: u32) -> Result<ReadyListener, RuntimeError> {
    let dir = match uid {
        0 => run_dir.to_path_buf(),
        _ => run_dir.join(VMM_DIR),
    };
    let vsock = dir.join(VSOCK_SOCKET);
    let path = ReadyListener::path_for(&vsock, proto::READY_PORT);
    let ready = ReadyListener::bind(&vsock, proto::READY_PORT)
        .map_err(RuntimeError::io("listening on", &path))?;
    secure_socket(&path)?;
    std::os::unix::fs::lchown(&path, Some(uid), Some(uid))
        .map_err(RuntimeError::io("handing over", &path))?;
    Ok(ready)
}

fn secure_socket(socket: &Path) -> Result<(), RuntimeError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .map_err(RuntimeError::io("securing", socket))
}

/// Makes `dir` (anew), mode 0700, owned by root or by `owner` (and its group).
fn private_dir(dir: &Path, owner: Option<u32>) -> Result<(), RuntimeError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(RuntimeError::io("creating", dir))?;
    if let Some(uid) = owner {
        std::os::unix::fs::chown(dir, Some(uid), Some(uid))
            .map_err(RuntimeError::io("handing over", dir))?;
    }
    Ok(())
}

/// Links the hybrid-vsock socket at `socket` (in the VM user's directory) to `link` (in
/// root's) once it is checked to be a socket of `uid`'s, not a link: the service then
/// reaches this socket through `link`, whatever the VM's user later puts at `socket`.
fn link_socket(id: &str, socket: &Path, uid: u32, link: &Path) -> Result<(), RuntimeError> {
    use rustix::fs::{AtFlags, CWD, FileType, Mode, OFlags};
    let pinned = rustix::fs::open(
        socket,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| RuntimeError::io("opening", socket)(e.into()))?;
    let stat =
        rustix::fs::fstat(&pinned).map_err(|e| RuntimeError::io("reading", socket)(e.into()))?;
    if FileType::from_raw_mode(stat.st_mode) != FileType::Socket || stat.st_uid != uid {
        return Err(RuntimeError::ForeignSocket {
            machine: id.to_string(),
            path: socket.to_path_buf(),
        });
    }
    rustix::fs::linkat(&pinned, "", CWD, link, AtFlags::EMPTY_PATH)
        .map_err(|e| RuntimeError::io("linking", link)(e.into()))
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
