//! Starting, watching, adopting and stopping VMs: [`Runtime`], the runtime's door.
//!
//! A start (`launch`) spawns the helpers (waiting for their sockets), then the VMM, each in a
//! process group of its own so that none dies with the service, and records them in the
//! machine's `run.json` (pids with start times, the runtime directory) before waiting for
//! the agent. A stop (`stop`) asks the agent, then the VMM, then kills. At service start,
//! `adopt` re-attaches to the VMs still running and ends what is left of the others.
//! Invariant: whenever the VMM exits, whatever the cause, a watcher (`Runtime::watch`)
//! kills its helpers, removes the runtime directory and `run.json`, and marks the VM stopped.
//! The watcher waits on a pidfd, so it works as well for a VMM adopted after a service
//! restart (no longer our child) as for one we started.
//!
//! A VM's runtime directory (`<run dir>/vm/<hash>/`) is root's (0700): `run.json`, the QMP
//! socket the service binds and hands to QEMU, `fs/` with virtiofsd's sockets, and
//! `agent.sock`, a hard link the service makes to vhost-device-vsock's hybrid socket once it
//! has checked that socket's owner. Its `vmm/` directory belongs to the VM's user (0700):
//! QEMU and vhost-device-vsock start there as that user and find the kernel, the initrd and
//! each other's socket by relative paths. The service never connects by a path inside
//! `vmm/`, which that user (a guest that escaped into QEMU) may change at will.
//!
//! Invariant: a VM is `running` only once its agent's readiness report was received and
//! recorded (`ready` in `run.json`) before it was acknowledged; the agent repeats an
//! unacknowledged report, so a service killed during a boot leaves a VM whose next service
//! hears the report (`adopt`), or forces the VM off when the boot timeout passes and
//! records why (`stopped.json`, shown by `inspect`).

mod adopt;
mod freeze;
mod launch;
mod stop;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use container_agent_proto as proto;
use container_agent_proto::client::ReadyListener;
use container_api::machine::MachineState;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::process::ProcessId;
use super::vmm::{TapPlumbing, Vmm};
use super::{RunningVm, RuntimeError, RuntimeOptions, console, helpers, qemu, sys};
use crate::fsutil;

/// A running VM ended because its guest rebooted itself (QEMU runs with `-no-reboot`): the
/// service decides whether to boot it again.
#[derive(Debug, Clone)]
pub struct Reboot {
    /// The VM's id (the machine name).
    pub name: String,
    /// When the VM's end was seen.
    pub at: std::time::Instant,
}

/// A running VM exited without anyone asking.
#[derive(Debug, Clone)]
pub struct Death {
    /// The VM's id (the machine name).
    pub name: String,
    /// The guest ended itself (its kernel powered off or rebooted), rather than crashing or
    /// being killed.
    pub clean: bool,
}

/// What is recorded about a running VM in `<machine dir>/run.json`, and again in its runtime
/// directory, where it outlives a machine directory lost in a crash (see
/// [`Runtime::adopt_all`]).
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
    /// The uid (and gid) the VMM and vhost-device-vsock run as; 0 for VMs started before
    /// they ran unprivileged.
    #[serde(default)]
    pub uid: u32,
    /// The agent's readiness report was received. Records from before this field were
    /// written by services that adopted only VMs that had reported.
    #[serde(default = "reported")]
    pub ready: bool,
    /// A stop was asked for, to be over by then: a service killed during it leaves a VM
    /// shutting down, which the next one adopts as stopping and forces off after this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_by: Option<chrono::DateTime<chrono::Utc>>,
}

fn reported() -> bool {
    true
}

/// Why a VM was last forced off or failed to boot, in `<machine dir>/stopped.json`; removed
/// at the next start.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StopReason {
    reason: String,
    at: chrono::DateTime<chrono::Utc>,
}

const STOP_REASON_FILE: &str = "stopped.json";

/// Records why the VM of `machine_dir` stopped (or never became usable), for `inspect`.
pub(super) fn record_stop_reason(machine_dir: &Path, reason: &str) {
    let record = StopReason {
        reason: reason.to_string(),
        at: chrono::Utc::now(),
    };
    let path = machine_dir.join(STOP_REASON_FILE);
    if let Err(e) = fsutil::write_json(&path, &record) {
        tracing::warn!(path = %path.display(), error = %e, "could not record why the machine stopped");
    }
}

/// Forgets why the VM of `machine_dir` stopped last: it starts again.
pub(super) fn clear_stop_reason(machine_dir: &Path) {
    let _ = std::fs::remove_file(machine_dir.join(STOP_REASON_FILE));
}

/// Why the VM of `machine_dir` was last forced off or failed to boot, if it was.
pub fn stop_reason(machine_dir: &Path) -> Option<String> {
    fsutil::read_json::<StopReason>(&machine_dir.join(STOP_REASON_FILE))
        .ok()
        .flatten()
        .map(|r| r.reason)
}

/// Where vhost-device-vsock delivers a VM's connections to host port P: `<vsock>_P`, which
/// the service binds and hands to `uid`, the user vhost-device-vsock runs as (root for a VM
/// an older service started).
#[derive(Debug, Clone)]
pub struct GuestPorts {
    pub vsock: PathBuf,
    pub uid: u32,
}

const RUN_FILE: &str = "run.json";
/// The hybrid-vsock socket of vhost-device-vsock, in the VMM's directory.
const VSOCK_SOCKET: &str = "vsock.sock";
/// The service's link to [`VSOCK_SOCKET`], in the runtime directory: the agent's door.
const AGENT_SOCKET: &str = "agent.sock";
/// The VMM's directory in the runtime directory, owned by the VM's user.
const VMM_DIR: &str = "vmm";
/// The VMM's control socket, in the runtime directory.
const CONTROL_SOCKET: &str = "qmp.sock";
/// How often a running guest's clock is set from the host's.
const CLOCK_SYNC_EVERY: Duration = Duration::from_secs(30);
/// How often a running guest's agent is pinged; `ls` shows the last outcome, so it costs
/// `ls` nothing. Every [`BOOT_CHECK_EVERY`] while its init is booting, so `--wait` ends soon
/// after the boot does.
const HEALTH_EVERY: u32 = 5;
const BOOT_CHECK_EVERY: Duration = Duration::from_secs(1);
/// How long a health ping may take: a vsock round trip takes milliseconds, but an emulated
/// guest on a loaded host can be slow to schedule its agent.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(3);
/// Missed health checks in a row before a machine is called unresponsive.
const HEALTH_MISSES: u32 = 2;

/// One VM the runtime supervises.
#[derive(Debug)]
pub(super) struct Vm {
    pub machine_dir: PathBuf,
    pub run: RunState,
    pub state: watch::Sender<MachineState>,
    /// Found running at service start rather than started by this service.
    pub adopted: bool,
    /// The agent of the running VM answered its last health check (see `HEALTH_EVERY`).
    pub responsive: AtomicBool,
    /// The image's init has finished booting, as the last health check learnt.
    pub booted: AtomicBool,
    /// Processes we spawned, reaped once they exit (none for an adopted VM).
    children: Mutex<Vec<Child>>,
}

impl Vm {
    pub fn agent_socket(&self) -> PathBuf {
        match self.run.uid {
            // Started by an older service, as root, with the socket in the runtime directory.
            0 => self.run.run_dir.join(VSOCK_SOCKET),
            _ => self.run.run_dir.join(AGENT_SOCKET),
        }
    }

    fn control_socket(&self) -> PathBuf {
        self.run.run_dir.join(CONTROL_SOCKET)
    }

    pub fn get(&self) -> MachineState {
        *self.state.borrow()
    }

    /// The state as users see it: a running VM whose agent missed its health checks is
    /// unresponsive.
    pub fn shown(&self) -> MachineState {
        match self.get() {
            MachineState::Running if !self.responsive.load(Ordering::Relaxed) => {
                MachineState::Unresponsive
            }
            MachineState::Running if !self.booted.load(Ordering::Relaxed) => MachineState::Booting,
            s => s,
        }
    }

    /// Waits until the VM is stopped, at most `limit`; true if it is.
    async fn stopped_within(&self, limit: Duration) -> bool {
        let mut rx = self.state.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|s| *s == MachineState::Stopped))
            .await
            .is_ok()
    }

    /// The VMM, then its helpers.
    fn processes(&self) -> Vec<ProcessId> {
        std::iter::once(self.run.qemu)
            .chain(self.run.helpers.iter().copied())
            .collect()
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

/// Starts, watches, adopts and stops VMs. Cheap to share (`Arc` inside), and shared with the
/// watcher tasks.
#[derive(Debug, Clone)]
pub struct Runtime(Arc<State>);

/// What [`Runtime`] shares with its watchers.
#[derive(Debug)]
struct State {
    options: RuntimeOptions,
    vmm: Arc<dyn Vmm>,
    vms: Mutex<HashMap<String, Arc<Vm>>>,
    /// Ids whose start is under way but whose VMM is not spawned yet (the initramfs, the
    /// helpers): they count as starting, not stopped.
    launching: Mutex<HashSet<String>>,
    /// Running VMs whose guest rebooted itself (and so exited).
    reboots: tokio::sync::broadcast::Sender<Reboot>,
    /// The uid of each VM starting or running, by id.
    uids: Mutex<HashMap<String, u32>>,
    /// VMs that exited while running, nobody having asked.
    deaths: tokio::sync::broadcast::Sender<Death>,
}

impl Runtime {
    /// A runtime with QEMU as the VMM. Running VMs are not adopted until [`Runtime::adopt_all`].
    pub fn new(options: RuntimeOptions) -> Self {
        let binary = helpers::find_binary(helpers::QEMU, options.helpers.qemu.as_deref())
            .unwrap_or_else(|_| PathBuf::from(helpers::QEMU));
        let accel = qemu::detect_accel(options.virtualization);
        let tsc_khz = match accel.kvm {
            true => None,
            false => sys::host_tsc_khz(Duration::from_millis(50)),
        };
        let vmm = qemu::Qemu {
            binary,
            accel,
            tsc_khz,
            tb_mib: options.tcg_translation_cache.map(|b| (b >> 20).max(1)),
        };
        Self::with_vmm(options, Arc::new(vmm))
    }

    /// A runtime with another VMM.
    pub fn with_vmm(options: RuntimeOptions, vmm: Arc<dyn Vmm>) -> Self {
        Runtime(Arc::new(State {
            options,
            vmm,
            vms: Mutex::new(Default::default()),
            launching: Mutex::new(Default::default()),
            reboots: tokio::sync::broadcast::channel(16).0,
            uids: Mutex::new(Default::default()),
            deaths: tokio::sync::broadcast::channel(16).0,
        }))
    }

    /// A start under way counts from its first step, before the VMM is spawned.
    pub fn status(&self, id: &str) -> MachineState {
        let state = self
            .get(id)
            .map(|v| v.shown())
            .unwrap_or(MachineState::Stopped);
        let launching = self.0.launching.lock().unwrap_or_else(|p| p.into_inner());
        match state == MachineState::Stopped && launching.contains(id) {
            true => MachineState::Starting,
            false => state,
        }
    }

    /// The running VM, if it is.
    pub fn running(&self, id: &str) -> Option<RunningVm> {
        self.get(id)
            .filter(|v| v.get() == MachineState::Running)
            .map(|v| v.info())
    }

    /// When the VM supervised under `id` was started, in whatever state it is now.
    pub fn started(&self, id: &str) -> Option<chrono::DateTime<chrono::Utc>> {
        self.get(id).map(|v| v.run.started)
    }

    /// What a running VM's processes and tap cost now; `None` unless it runs.
    pub fn usage(&self, id: &str) -> Option<super::usage::VmUsage> {
        let vm = self.get(id).filter(|v| v.get() == MachineState::Running)?;
        Some(super::usage::read(&vm.processes(), vm.run.tap.as_deref()))
    }

    /// Host CPU time of a running VM's processes; `None` unless it runs.
    pub fn cpu_time(&self, id: &str) -> Option<u64> {
        let vm = self.get(id).filter(|v| v.get() == MachineState::Running)?;
        Some(super::usage::cpu_time(&vm.processes()))
    }

    /// Ids of the VMs that run now.
    pub fn running_ids(&self) -> Vec<String> {
        self.vms()
            .iter()
            .filter(|(_, v)| v.get() == MachineState::Running)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// The hybrid-vsock socket of a running VM's agent; an error for an unresponsive one.
    /// Where the guest's connections to host ports of running VM `id` arrive.
    pub fn guest_ports(&self, id: &str) -> Result<GuestPorts, RuntimeError> {
        let vm = self
            .get(id)
            .filter(|v| v.get() == MachineState::Running)
            .ok_or_else(|| RuntimeError::NotRunning(id.to_string()))?;
        let dir = match vm.run.uid {
            0 => vm.run.run_dir.clone(),
            _ => vm.run.run_dir.join(VMM_DIR),
        };
        Ok(GuestPorts {
            vsock: dir.join(VSOCK_SOCKET),
            uid: vm.run.uid,
        })
    }

    pub fn agent_socket(&self, id: &str) -> Result<PathBuf, RuntimeError> {
        match self.get(id) {
            Some(vm) if vm.shown() == MachineState::Unresponsive => {
                Err(RuntimeError::Unresponsive(id.to_string()))
            }
            _ => self
                .running(id)
                .map(|v| v.agent_socket)
                .ok_or_else(|| RuntimeError::NotRunning(id.to_string())),
        }
    }

    /// Ids of running VMs that stopped because their guest rebooted (QEMU runs with
    /// `-no-reboot`): the caller decides whether to boot them again.
    pub fn reboots(&self) -> tokio::sync::broadcast::Receiver<Reboot> {
        self.0.reboots.subscribe()
    }

    /// Ids of VMs that exited while running without anyone asking (power-off inside, crash,
    /// kill, reboot).
    pub fn deaths(&self) -> tokio::sync::broadcast::Receiver<Death> {
        self.0.deaths.subscribe()
    }

    /// The VM supervised under `id`, in whatever state.
    pub(super) fn get(&self, id: &str) -> Option<Arc<Vm>> {
        self.vms().get(id).cloned()
    }

    fn vms(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Vm>>> {
        self.0.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn uids(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.0.uids.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves a uid for the VM `id`, none other starting or running has.
    fn reserve_uid(&self, id: &str) -> Result<u32, RuntimeError> {
        let mut uids = self.uids();
        // A previous VM of the same id may still be cleaning up: its uid counts too.
        let taken = uids.values().copied().collect();
        let uid = self.0.options.vm_users.pick(&taken)?;
        uids.insert(id.to_string(), uid);
        Ok(uid)
    }

    /// Frees the uid of the VM `id`, if it is still `uid` (a later start may hold another).
    fn release_uid(&self, id: &str, uid: u32) {
        let mut uids = self.uids();
        if uids.get(id) == Some(&uid) {
            uids.remove(id);
        }
    }

    fn network(&self, id: &str) -> Result<&Arc<dyn TapPlumbing>, RuntimeError> {
        self.0
            .options
            .network
            .as_ref()
            .ok_or_else(|| RuntimeError::NoNetwork(id.to_string()))
    }

    /// Waits for the VMM to exit, then cleans up after it.
    fn watch(&self, vm: Arc<Vm>) {
        let this = self.clone();
        tokio::spawn(async move {
            // While the VMM runs, the guest's clock is set from the host's now and then: it
            // drifts, and stops outright while the host is suspended. The first tick comes at
            // once, which sets the clock of a VM adopted after a service restart.
            let exited = vm.run.qemu.exited();
            tokio::pin!(exited);
            let mut tick = tokio::time::interval(CLOCK_SYNC_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            // A guest may flood its console: its size is checked every second.
            let mut console_check = tokio::time::interval(Duration::from_secs(1));
            console_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let console = console::console_path(&vm.machine_dir);
            // The first check comes at once: a VM adopted after a service restart is shown
            // booting until it.
            let mut health = tokio::time::interval(BOOT_CHECK_EVERY);
            health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut ticks = 0u32;
            let mut misses = 0;
            loop {
                tokio::select! {
                    _ = &mut exited => break,
                    _ = tick.tick() => {
                        if vm.get() == MachineState::Running {
                            sync_clock(&vm.run.id, &vm.agent_socket()).await;
                        }
                    }
                    _ = health.tick() => {
                        ticks = ticks.wrapping_add(1);
                        let due = !vm.booted.load(Ordering::Relaxed) || ticks.is_multiple_of(HEALTH_EVERY);
                        if vm.get() == MachineState::Running && due {
                            misses = check_health(&vm, misses).await;
                        }
                    }
                    _ = console_check.tick() => {
                        let path = console.clone();
                        let _ = tokio::task::spawn_blocking(move || console::trim(&path)).await;
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
                && let Some(network) = &this.0.options.network
            {
                network.detach(&vm.run.id).await;
            }
            vm.state.send_replace(MachineState::Stopped);
            {
                let mut vms = this.vms();
                if vms.get(&vm.run.id).is_some_and(|v| Arc::ptr_eq(v, &vm)) {
                    vms.remove(&vm.run.id);
                }
            }
            this.release_uid(&vm.run.id, vm.run.uid);
            tracing::info!(machine = %vm.run.id, "machine stopped");
            if unasked {
                let _ = this.0.deaths.send(Death {
                    name: vm.run.id.clone(),
                    clean: console::ended_itself(&vm.machine_dir),
                });
            }
            if unasked && console::rebooted(&vm.machine_dir) {
                // Nobody may be listening (a runtime without a service): nothing to do then.
                let _ = this.0.reboots.send(Reboot {
                    name: vm.run.id.clone(),
                    at: exited_at,
                });
            }
        });
    }
}

impl Runtime {
    /// Waits for the agent's readiness report until `deadline`, records it in `run.json`,
    /// acknowledges it (in that order: see the module's invariant), then pings the agent.
    async fn await_agent(
        &self,
        vm: &Vm,
        ready: &ReadyListener,
        deadline: Instant,
    ) -> Result<proto::client::Readiness, proto::ProtoError> {
        let report = ready.wait(deadline).await?;
        // Unrecorded, the report is not acknowledged: the agent repeats it.
        rewrite_run(vm, |run| run.ready = true).await?;
        report.acknowledge().await;
        proto::client::ping_until(&vm.agent_socket(), proto::PORT, deadline).await
    }
}

/// Learns from the agent that just answered whether the image's init has finished booting.
/// The agent answers a moment before it hands PID 1 over to init: that moment is waited
/// out (briefly), so an init that boots at once (busybox) is never shown booting.
async fn learn_boot(vm: &Vm, mut readiness: proto::client::Readiness) {
    let handover = Instant::now() + Duration::from_secs(2);
    while !readiness.init_running && Instant::now() < handover {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let ping = async {
            proto::client::AgentClient::connect(&vm.agent_socket(), proto::PORT)
                .await?
                .ping()
                .await
        };
        match tokio::time::timeout(HEALTH_TIMEOUT, ping).await {
            Ok(Ok(r)) => readiness = r,
            _ => break,
        }
    }
    vm.booted.store(readiness.booted, Ordering::Relaxed);
}

/// Rewrites the VM's `run.json` (both copies) with `change` made to what is recorded.
async fn rewrite_run(vm: &Vm, change: impl FnOnce(&mut RunState)) -> std::io::Result<()> {
    let mut run = vm.run.clone();
    if let Ok(Some(recorded)) = fsutil::read_json::<RunState>(&vm.machine_dir.join(RUN_FILE)) {
        run.ready = recorded.ready;
        run.stop_by = recorded.stop_by;
    }
    change(&mut run);
    let files = [vm.machine_dir.join(RUN_FILE), vm.run.run_dir.join(RUN_FILE)];
    tokio::task::spawn_blocking(move || files.iter().try_for_each(|f| fsutil::write_json(f, &run)))
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?
}

/// Pings a running VM's agent; the count of checks missed in a row, after this one. The VM
/// is unresponsive from [`HEALTH_MISSES`] misses until it answers again.
async fn check_health(vm: &Vm, misses: u32) -> u32 {
    let ping = async {
        proto::client::AgentClient::connect(&vm.agent_socket(), proto::PORT)
            .await?
            .ping()
            .await
    };
    let misses = match tokio::time::timeout(HEALTH_TIMEOUT, ping).await {
        Ok(Ok(readiness)) => {
            if readiness.booted && !vm.booted.swap(true, Ordering::Relaxed) {
                tracing::info!(machine = %vm.run.id, "the machine's init finished booting");
            }
            0
        }
        _ => misses + 1,
    };
    let responsive = misses < HEALTH_MISSES;
    if vm.responsive.swap(responsive, Ordering::Relaxed) != responsive {
        match responsive {
            true => tracing::info!(machine = %vm.run.id, "the guest agent answers again"),
            false => {
                tracing::warn!(machine = %vm.run.id, misses, "the guest agent does not answer its health checks: the machine is unresponsive")
            }
        }
    }
    misses
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

/// Kills what is left of a VM and removes its runtime files.
fn cleanup(run: &RunState, machine_dir: &Path) {
    kill_all(run);
    let _ = std::fs::remove_dir_all(&run.run_dir);
    let _ = std::fs::remove_file(machine_dir.join(RUN_FILE));
    console::write_boot_log(machine_dir);
}

/// Kills the VMM and the helpers of a VM, and waits for them to be gone.
fn kill_all(run: &RunState) {
    let mut all = vec![run.qemu];
    all.extend(&run.helpers);
    kill_processes(&all);
}

/// Kills these processes (each only while it is still the recorded one) and waits for them
/// to be gone.
fn kill_processes(all: &[ProcessId]) {
    for p in all {
        p.kill();
    }
    // A machine is stopped only once nothing of it runs: wait for the kills to land (a
    // process with many threads takes a moment to die), bounded in case one is stuck.
    let deadline = Instant::now() + Duration::from_secs(5);
    while all.iter().any(|p| p.alive()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}
