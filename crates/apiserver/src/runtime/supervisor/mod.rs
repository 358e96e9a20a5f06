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

mod adopt;
mod freeze;
mod launch;
mod stop;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use container_agent_proto as proto;
use container_api::machine::MachineState;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::process::ProcessId;
use super::vmm::{TapPlumbing, Vmm};
use super::{RunningVm, RuntimeError, RuntimeOptions, console, helpers, qemu, sys};

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
            .map(|v| v.get())
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

    /// The hybrid-vsock socket of a running VM's agent.
    pub fn agent_socket(&self, id: &str) -> Result<PathBuf, RuntimeError> {
        self.running(id)
            .map(|v| v.agent_socket)
            .ok_or_else(|| RuntimeError::NotRunning(id.to_string()))
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
            loop {
                tokio::select! {
                    _ = &mut exited => break,
                    _ = tick.tick() => {
                        if vm.get() == MachineState::Running {
                            sync_clock(&vm.run.id, &vm.agent_socket()).await;
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
