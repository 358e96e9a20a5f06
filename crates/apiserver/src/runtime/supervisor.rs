//! Starting, watching, adopting and stopping VMs.
//!
//! A start spawns the helpers (waiting for their sockets), then the VMM, each in a process
//! group of its own so that none dies with the service, and records them in the machine's
//! `run.json` (pids with start times, the runtime directory) before waiting for the agent.
//! Invariant: whenever the VMM exits, whatever the cause, a watcher kills its helpers,
//! removes the runtime directory and `run.json`, and marks the VM stopped. The watcher waits
//! on a pidfd, so it works as well for a VMM adopted after a service restart (no longer our
//! child) as for one we started.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use container_agent_proto as proto;
use container_agent_proto::client::ReadyListener;
use container_api::machine::MachineState;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::helpers::{self, VHOST_DEVICE_VSOCK, VIRTIOFSD};
use super::process::ProcessId;
use super::vmm::{Launch, Vmm};
use super::{RunningVm, RuntimeError, RuntimeOptions, VmSpec, console, initramfs};
use crate::core::ports::Reboot;
use crate::fsutil;

/// What is recorded about a running VM in `<machine dir>/run.json`, and again in its runtime
/// directory, where it outlives a machine directory lost in a crash (see
/// [`Supervisor::reap_orphans`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct RunState {
    #[serde(default)]
    pub id: String,
    pub qemu: ProcessId,
    pub helpers: Vec<ProcessId>,
    pub run_dir: PathBuf,
    pub started: chrono::DateTime<chrono::Utc>,
    /// The VM's tap, removed after the VMM exits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
}

const RUN_FILE: &str = "run.json";
const HELPER_LOG: &str = "helpers.log";
/// Longest Unix socket path (sun_path holds 108 bytes with the terminating NUL).
const MAX_SOCKET_PATH: usize = 107;
/// How long a guest may print nothing before its boot is retried.
const SILENCE_LIMIT: Duration = Duration::from_secs(20);
/// Boot attempts when the guest stays silent.
const ATTEMPTS: u32 = 3;
/// How often a running guest's clock is set from the host's.
const CLOCK_SYNC_EVERY: Duration = Duration::from_secs(30);
/// Waited beyond the caller's stop timeout for the agent's own forced power-off.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// One VM the runtime supervises.
#[derive(Debug)]
pub(super) struct Vm {
    pub machine_dir: PathBuf,
    pub run: RunState,
    pub state: watch::Sender<MachineState>,
    /// Processes we spawned, reaped once they exit (none for an adopted VM).
    children: Mutex<Vec<Child>>,
}

impl Vm {
    pub fn agent_socket(&self) -> PathBuf {
        self.run.run_dir.join("vsock.sock")
    }

    fn control_socket(&self) -> PathBuf {
        self.run.run_dir.join("qmp.sock")
    }

    pub fn get(&self) -> MachineState {
        *self.state.borrow()
    }

    /// Waits until the VM is stopped, at most `limit`; true if it is.
    async fn stopped_within(&self, limit: Duration) -> bool {
        let mut rx = self.state.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|s| *s == MachineState::Stopped))
            .await
            .is_ok()
    }

    pub fn info(&self) -> RunningVm {
        RunningVm {
            id: self.run.id.clone(),
            pid: self.run.qemu.pid(),
            run_dir: self.run.run_dir.clone(),
            agent_socket: self.agent_socket(),
            console: console::console_path(&self.machine_dir),
            started: self.run.started,
        }
    }
}

/// The supervisor's state, shared with the watcher tasks.
#[derive(Debug)]
pub(super) struct Supervisor {
    pub options: RuntimeOptions,
    pub vmm: Arc<dyn Vmm>,
    pub vms: Mutex<HashMap<String, Arc<Vm>>>,
    /// Ids whose start is under way but whose VMM is not spawned yet (the initramfs, the
    /// helpers): they count as starting, not stopped.
    pub launching: Mutex<std::collections::HashSet<String>>,
    /// Running VMs whose guest rebooted itself (and so exited).
    pub reboots: tokio::sync::broadcast::Sender<Reboot>,
}

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

fn check_socket(path: &Path) -> Result<(), RuntimeError> {
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(RuntimeError::SocketPathTooLong(path.to_path_buf()));
    }
    Ok(())
}

impl Supervisor {
    pub fn get(&self, id: &str) -> Option<Arc<Vm>> {
        self.vms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    fn network(&self, id: &str) -> Result<&Arc<dyn super::TapPlumbing>, RuntimeError> {
        self.options
            .network
            .as_ref()
            .ok_or_else(|| RuntimeError::NoNetwork(id.to_string()))
    }

    /// The per-VM runtime directory: short, so socket paths stay under the limit.
    fn run_dir(&self, id: &str) -> PathBuf {
        let short = hex::encode(&<sha2::Sha256 as sha2::Digest>::digest(id.as_bytes())[..6]);
        self.options.run_dir.join("vm").join(short)
    }

    /// Boots, retrying when the guest stays silent: under software emulation a guest kernel
    /// occasionally stalls before its first console line; a fresh start gets past it.
    pub async fn start(self: &Arc<Self>, spec: VmSpec) -> Result<RunningVm, RuntimeError> {
        if let Some(vm) = self.get(&spec.id)
            && vm.get() != MachineState::Stopped
        {
            return Err(RuntimeError::AlreadyRunning(spec.id));
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

    async fn start_once(
        self: &Arc<Self>,
        spec: &VmSpec,
        may_retry: bool,
    ) -> Result<RunningVm, Attempt> {
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
                    && let Some(network) = &self.options.network
                {
                    network.detach(&spec.id).await;
                }
                return Err(e.into());
            }
        };
        let vm = Arc::new(vm);
        self.vms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(spec.id.clone(), vm.clone());
        self.watch(vm.clone());

        // The agent says when it is ready; nothing connects to it before (see
        // `ReadyListener`). Meanwhile the VM may exit, or stay silent.
        let console = console::console_path(&spec.machine_dir);
        let launched = Instant::now();
        let deadline = launched + self.options.boot_timeout;
        let agent_socket = vm.agent_socket();
        let answered = proto::client::wait_ready(&ready, &agent_socket, proto::PORT, deadline);
        tokio::pin!(answered);
        let mut check = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                answered = &mut answered => match answered {
                    Ok(_) => break,
                    Err(source) => {
                        self.force_stop(&vm).await;
                        return Err(Attempt::Failed(RuntimeError::AgentTimeout {
                            secs: self.options.boot_timeout.as_secs(),
                            tail: console::tail(&console, 20),
                            log: console,
                            source,
                        }));
                    }
                },
                _ = check.tick() => {
                    if vm.get() == MachineState::Stopped {
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
        }
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
        let o = &self.options;
        let agent = helpers::find_binary(helpers::AGENT, o.helpers.agent.as_deref())?;
        let vsock_bin =
            helpers::find_binary(VHOST_DEVICE_VSOCK, o.helpers.vhost_device_vsock.as_deref())?;
        let fs_bin = match spec.shares.is_empty() {
            true => None,
            false => Some(helpers::find_binary(
                VIRTIOFSD,
                o.helpers.virtiofsd.as_deref(),
            )?),
        };
        let initrd = initramfs::build(&o.root.join("initramfs"), &spec.kernel, &agent)?;

        let run_dir = self.run_dir(&spec.id);
        let _ = std::fs::remove_dir_all(&run_dir);
        std::fs::create_dir_all(&run_dir).map_err(RuntimeError::io("creating", &run_dir))?;
        let vhu = run_dir.join("vhu.sock");
        let vsock = run_dir.join("vsock.sock");
        let control = run_dir.join("qmp.sock");
        let fs_dir = run_dir.join("fs");
        let shares: Vec<(String, PathBuf)> = spec
            .shares
            .iter()
            .map(|s| (s.tag.clone(), fs_dir.join(format!("{}.sock", s.tag))))
            .collect();
        let ready_path = ReadyListener::path_for(&vsock, proto::READY_PORT);
        for p in [&vhu, &vsock, &ready_path, &control]
            .into_iter()
            .chain(shares.iter().map(|(_, p)| p))
        {
            check_socket(p)?;
        }

        let mut boot = spec.boot.clone();
        boot.version = proto::VERSION;
        boot.vsock_port = proto::PORT;
        boot.ready_port = proto::READY_PORT;
        boot.modules = initrd.modules.clone();
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
        let initrd_path = run_dir.join("initrd.img");
        let boot_json = serde_json::to_vec(&boot).map_err(|e| RuntimeError::Io {
            what: "encoding the boot config for",
            path: initrd_path.clone(),
            source: std::io::Error::other(e),
        })?;
        initramfs::with_boot_config(&initrd.path, &boot_json, &initrd_path)?;

        let ready = ReadyListener::bind(&vsock, proto::READY_PORT)
            .map_err(RuntimeError::io("listening on", &ready_path))?;
        let log = spec.machine_dir.join(HELPER_LOG);
        let _ = std::fs::remove_file(&log);
        console::reset(&spec.machine_dir);
        let mut started = Started::default();
        let result = (|| {
            let mut c = std::process::Command::new(&vsock_bin);
            c.arg("--guest-cid")
                .arg("3")
                .arg("--socket")
                .arg(&vhu)
                .arg("--uds-path")
                .arg(&vsock);
            started.helper(helpers::spawn(c, VHOST_DEVICE_VSOCK, &log)?);
            helpers::wait_for_socket(&vhu, started.last(), VHOST_DEVICE_VSOCK, &log)?;

            if let Some(fs_bin) = &fs_bin {
                std::fs::create_dir_all(&fs_dir).map_err(RuntimeError::io("creating", &fs_dir))?;
                for (s, (_, sock)) in spec.shares.iter().zip(&shares) {
                    // virtiofsd runs as the machine's owner, so the guest reaches only what
                    // the owner can; unprivileged, it needs `--sandbox none`.
                    let _ = std::os::unix::fs::chown(&fs_dir, Some(s.owner_uid), Some(s.owner_gid));
                    let mut c = std::process::Command::new(fs_bin);
                    c.arg("--socket-path")
                        .arg(sock)
                        .arg("--shared-dir")
                        .arg(&s.host_path)
                        .args(["--sandbox", "none", "--cache", "auto"]);
                    if s.read_only {
                        c.arg("--readonly");
                    }
                    if s.owner_uid != nix::unistd::geteuid().as_raw() {
                        use std::os::unix::process::CommandExt;
                        c.uid(s.owner_uid).gid(s.owner_gid);
                    }
                    started.helper(helpers::spawn(c, VIRTIOFSD, &log)?);
                    helpers::wait_for_socket(sock, started.last(), VIRTIOFSD, &log)?;
                }
            }

            let console = console::console_path(&spec.machine_dir);
            let launch = Launch {
                cpus: spec.cpus,
                memory_mib: (spec.memory_bytes >> 20).max(64),
                kernel: &spec.kernel.vmlinuz,
                initrd: &initrd_path,
                disk: &spec.disk,
                console: &console,
                control: &control,
                vsock: &vhu,
                shares: &shares,
                net: spec.net.as_ref(),
            };
            let vmm = helpers::spawn(self.vmm.command(&launch), helpers::QEMU, &log)?;
            let qemu = ProcessId::of(vmm.id()).unwrap_or(ProcessId(vmm.id() as i32, 0));
            started.children.push(vmm);
            let run = RunState {
                id: spec.id.clone(),
                qemu,
                helpers: started.helpers.clone(),
                run_dir: run_dir.clone(),
                started: chrono::Utc::now(),
                tap: spec.net.as_ref().map(|n| n.tap.clone()),
            };
            for run_file in [spec.machine_dir.join(RUN_FILE), run_dir.join(RUN_FILE)] {
                fsutil::write_json(&run_file, &run)
                    .map_err(RuntimeError::io("writing", &run_file))?;
            }
            Ok(run)
        })();
        match result {
            Ok(run) => Ok((
                Vm {
                    machine_dir: spec.machine_dir.clone(),
                    run,
                    state: watch::Sender::new(MachineState::Starting),
                    children: Mutex::new(std::mem::take(&mut started.children)),
                },
                ready,
            )),
            Err(e) => {
                started.kill_all();
                let _ = std::fs::remove_dir_all(&run_dir);
                Err(e)
            }
        }
    }

    /// Waits for the VMM to exit, then cleans up after it.
    fn watch(self: &Arc<Self>, vm: Arc<Vm>) {
        let this = self.clone();
        tokio::spawn(async move {
            // While the VMM runs, the guest's clock is set from the host's now and then: it
            // drifts, and stops outright while the host is suspended. The first tick comes at
            // once, which sets the clock of a VM adopted after a service restart.
            let exited = vm.run.qemu.exited();
            tokio::pin!(exited);
            let mut tick = tokio::time::interval(CLOCK_SYNC_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    _ = &mut exited => break,
                    _ = tick.tick() => {
                        if vm.get() == MachineState::Running {
                            sync_clock(&vm.run.id, &vm.agent_socket()).await;
                        }
                    }
                }
            }
            let exited_at = Instant::now();
            // Nobody asked for this exit: the guest powered off, rebooted or died.
            let unasked = vm.get() == MachineState::Running;
            tracing::debug!(machine = %vm.run.id, "the VMM exited; cleaning up");
            let cleaned = vm.clone();
            let _ = tokio::task::spawn_blocking(move || {
                cleanup(&cleaned.run, &cleaned.machine_dir);
                let mut children = cleaned.children.lock().unwrap_or_else(|p| p.into_inner());
                for c in children.iter_mut() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                children.clear();
            })
            .await;
            // The tap goes before the state says stopped: a start that follows must not
            // have its fresh tap deleted under it.
            if vm.run.tap.is_some()
                && let Some(network) = &this.options.network
            {
                network.detach(&vm.run.id).await;
            }
            vm.state.send_replace(MachineState::Stopped);
            let mut vms = this.vms.lock().unwrap_or_else(|p| p.into_inner());
            if vms.get(&vm.run.id).is_some_and(|v| Arc::ptr_eq(v, &vm)) {
                vms.remove(&vm.run.id);
            }
            tracing::info!(machine = %vm.run.id, "machine stopped");
            if unasked && console::rebooted(&vm.machine_dir) {
                // Nobody may be listening (a runtime without a service): nothing to do then.
                let _ = this.reboots.send(Reboot {
                    name: vm.run.id.clone(),
                    at: exited_at,
                });
            }
        });
    }

    /// Re-attaches to the VM recorded in `machine_dir` if its VMM still runs, else cleans up
    /// after it. True when a running VM was adopted.
    pub fn adopt(self: &Arc<Self>, machine_dir: &Path) -> bool {
        let Ok(Some(mut run)) = fsutil::read_json::<RunState>(&machine_dir.join(RUN_FILE)) else {
            return false;
        };
        if run.id.is_empty() {
            run.id = machine_dir
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
        }
        if self.get(&run.id).is_some() {
            return true;
        }
        if !run.qemu.alive() {
            tracing::info!(machine = %run.id, "cleaning up after a machine that stopped while the service was down");
            cleanup(&run, machine_dir);
            return false;
        }
        tracing::info!(machine = %run.id, pid = run.qemu.pid(), "adopting a running machine");
        let vm = Arc::new(Vm {
            machine_dir: machine_dir.to_path_buf(),
            run,
            state: watch::Sender::new(MachineState::Running),
            children: Mutex::new(Vec::new()),
        });
        self.vms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(vm.run.id.clone(), vm.clone());
        self.watch(vm);
        true
    }

    /// Ends what runs of VMs no adopted machine owns: a runtime directory whose machine
    /// directory vanished while the service was down (a crash, a hand-removed directory)
    /// still names its VMM and helpers, which are killed (when still the recorded
    /// processes), and the directory goes. Call after adopting every machine.
    pub fn reap_orphans(&self) {
        let owned: Vec<PathBuf> = self
            .vms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|v| v.run.run_dir.clone())
            .collect();
        let Ok(entries) = std::fs::read_dir(self.options.run_dir.join("vm")) else {
            return;
        };
        for dir in entries.flatten().map(|e| e.path()) {
            if owned.contains(&dir) || !dir.is_dir() {
                continue;
            }
            if let Ok(Some(run)) = fsutil::read_json::<RunState>(&dir.join(RUN_FILE)) {
                tracing::info!(machine = %run.id, "ending the processes of a VM whose machine is gone");
                kill_all(&run);
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    /// Asks the agent to shut the machine down; forces it off after `timeout` and a grace.
    pub async fn stop(
        &self,
        id: &str,
        signal: Option<i32>,
        timeout: Duration,
    ) -> Result<(), RuntimeError> {
        let Some(vm) = self.get(id) else {
            return Ok(());
        };
        let was = vm.get();
        if was == MachineState::Stopped {
            return Ok(());
        }
        vm.state.send_replace(MachineState::Stopping);
        if was == MachineState::Starting {
            // The agent has not said it is ready, so it may not be reached safely (see
            // `ReadyListener`), and the image's init has at most just started: there is
            // nothing to stop cleanly yet.
            tracing::debug!(machine = %id, "stopped while booting; forcing the VM off");
        } else if self.stop_through_agent(&vm, signal, timeout).await {
            return Ok(());
        }
        if self.force_stop(&vm).await {
            Ok(())
        } else {
            Err(RuntimeError::DidNotExit(id.to_string()))
        }
    }

    /// Asks the agent to stop the machine through its init; true once the VM is stopped,
    /// false (logged) when it has to be forced off.
    async fn stop_through_agent(&self, vm: &Vm, signal: Option<i32>, timeout: Duration) -> bool {
        let id = &vm.run.id;
        match tokio::time::timeout(Duration::from_secs(5), async {
            proto::client::AgentClient::connect(&vm.agent_socket(), proto::PORT)
                .await?
                .shutdown(signal, timeout)
                .await
        })
        .await
        {
            Ok(Ok(())) => {
                tracing::debug!(machine = %id, "the guest agent took the stop request");
                if vm.stopped_within(timeout + STOP_GRACE).await {
                    return true;
                }
                tracing::warn!(machine = %id, "the machine did not power off in time; forcing it off");
            }
            Ok(Err(e)) => {
                tracing::warn!(machine = %id, "the guest agent did not take the stop request ({e}); forcing the VM off");
            }
            Err(_) => {
                tracing::warn!(machine = %id, "the guest agent did not answer the stop request; forcing the VM off");
            }
        }
        false
    }

    /// Asks the VMM to quit, then kills it. True once the VM is stopped.
    async fn force_stop(&self, vm: &Vm) -> bool {
        if self.vmm.quit(&vm.control_socket()).await.is_ok()
            && vm.stopped_within(Duration::from_secs(3)).await
        {
            return true;
        }
        vm.run.qemu.kill();
        vm.stopped_within(Duration::from_secs(10)).await
    }
}

/// Sets the guest's clock to the host's. Failures are logged: the next tick tries again.
async fn sync_clock(id: &str, socket: &Path) {
    let set = async {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        proto::client::AgentClient::connect(socket, proto::PORT)
            .await?
            .set_time(now)
            .await
    };
    match tokio::time::timeout(Duration::from_secs(5), set).await {
        Ok(Ok(())) => tracing::debug!(machine = %id, "guest clock set"),
        Ok(Err(e)) => tracing::debug!(machine = %id, error = %e, "could not set the guest clock"),
        Err(_) => tracing::debug!(machine = %id, "the guest agent did not answer the clock update"),
    }
}

/// Marks a start in progress until dropped (the start returned or was cancelled).
struct Launching<'a> {
    sup: &'a Supervisor,
    id: String,
}

impl<'a> Launching<'a> {
    fn new(sup: &'a Supervisor, id: &str) -> Self {
        let mut launching = sup.launching.lock().unwrap_or_else(|p| p.into_inner());
        launching.insert(id.to_string());
        Launching {
            sup,
            id: id.to_string(),
        }
    }
}

impl Drop for Launching<'_> {
    fn drop(&mut self) {
        let mut launching = self.sup.launching.lock().unwrap_or_else(|p| p.into_inner());
        launching.remove(&self.id);
    }
}

/// Processes spawned by a start in progress, killed if the start fails.
#[derive(Default)]
struct Started {
    helpers: Vec<ProcessId>,
    children: Vec<Child>,
}

impl Started {
    fn helper(&mut self, child: Child) {
        if let Some(id) = ProcessId::of(child.id()) {
            self.helpers.push(id);
        }
        self.children.push(child);
    }

    fn last(&mut self) -> &mut Child {
        self.children.last_mut().expect("a helper was just started")
    }

    fn kill_all(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Kills what is left of a VM and removes its runtime files.
fn cleanup(run: &RunState, machine_dir: &Path) {
    kill_all(run);
    let _ = std::fs::remove_dir_all(&run.run_dir);
    let _ = std::fs::remove_file(machine_dir.join(RUN_FILE));
    console::write_boot_log(machine_dir);
}

/// Kills the VMM and the helpers of a VM, and waits for them to be gone.
fn kill_all(run: &RunState) {
    run.qemu.kill();
    for h in &run.helpers {
        h.kill();
    }
    // A machine is stopped only once nothing of it runs: wait for the kills to land (a
    // process with many threads takes a moment to die), bounded in case one is stuck.
    let deadline = Instant::now() + Duration::from_secs(5);
    while (run.qemu.alive() || run.helpers.iter().any(|h| h.alive())) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}
