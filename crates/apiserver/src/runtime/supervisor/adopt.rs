//! Adoption at service start: the VMs whose VMM outlived the service are watched again;
//! what is left of the others (their helpers, runtime directories, `run.json`) goes.
//! A VM whose agent had not reported ready (the service died during its boot) is adopted
//! as starting: the service listens for the report again (the agent repeats it until one
//! is acknowledged) and never connects to the agent before it; a VM that does not report
//! within the boot timeout, counted from its launch, is forced off with the reason kept.
//! A VM whose stop was under way is adopted as stopping, and forced off if it does not
//! power off by the stop's deadline.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use container_agent_proto as proto;
use container_agent_proto::client::ReadyListener;
use container_api::machine::MachineState;
use tokio::sync::watch;

use super::launch::{SPAWNED_FILE, listen_for_ready};
use super::stop::STOP_GRACE;
use super::{
    RUN_FILE, RunState, Runtime, Vm, cleanup, console, kill_all, kill_processes, learn_boot,
    record_stop_reason, sync_clock,
};
use crate::fsutil;
use crate::runtime::process::ProcessId;

/// The least time an adopted VM gets to repeat its readiness report to the new service,
/// however long ago it was launched: the agent repeats it every second.
const ADOPTED_BOOT_GRACE: Duration = Duration::from_secs(15);

impl Runtime {
    /// Re-attaches to the VM recorded in `machine_dir` when it still runs, else cleans up
    /// after it. True when a running VM was adopted.
    pub fn adopt(&self, machine_dir: &Path) -> bool {
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
        tracing::info!(machine = %run.id, pid = run.qemu.pid(), uid = run.uid, "adopting a running machine");
        if run.uid != 0 {
            self.uids().insert(run.id.clone(), run.uid);
        }
        let stop_by = run.stop_by;
        let booting = !run.ready && stop_by.is_none();
        let ready = match booting {
            false => None,
            true => match listen_for_ready(&run.run_dir, run.uid) {
                Ok(l) => Some(l),
                Err(e) => {
                    // Without a listener the report cannot arrive: the wait below times
                    // out and the VM is forced off, never left running unusable.
                    tracing::warn!(machine = %run.id, error = %e, "cannot listen for the agent's readiness report");
                    None
                }
            },
        };
        tracing::info!(machine = %run.id, booting, "adopted");
        let vm = Arc::new(Vm {
            machine_dir: machine_dir.to_path_buf(),
            run,
            state: watch::Sender::new(match (stop_by, booting) {
                (Some(_), _) => MachineState::Stopping,
                (None, true) => MachineState::Starting,
                (None, false) => MachineState::Running,
            }),
            adopted: true,
            responsive: AtomicBool::new(true),
            booted: AtomicBool::new(false),
            children: Mutex::new(Vec::new()),
        });
        self.vms().insert(vm.run.id.clone(), vm.clone());
        self.watch(vm.clone());
        if booting {
            let this = self.clone();
            tokio::spawn(async move { this.finish_boot(vm, ready).await });
        } else if let Some(stop_by) = stop_by {
            let this = self.clone();
            tokio::spawn(async move { this.finish_stop(vm, stop_by).await });
        }
        true
    }

    /// Waits for an adopted VM whose stop was under way to power off, until the stop's
    /// deadline (at least [`STOP_GRACE`] from now), then forces it off.
    async fn finish_stop(&self, vm: Arc<Vm>, stop_by: chrono::DateTime<chrono::Utc>) {
        let left = (stop_by - chrono::Utc::now())
            .to_std()
            .unwrap_or_default()
            .max(STOP_GRACE);
        if !vm.stopped_within(left).await {
            tracing::warn!(machine = %vm.run.id, "the machine whose stop was cut off did not power off in time; forcing it off");
            self.force_stop(&vm).await;
        }
    }

    /// Waits for the readiness report of an adopted VM that had not given it, until the boot
    /// timeout counted from its launch (at least [`ADOPTED_BOOT_GRACE`] from now); marks it
    /// running, or forces it off and records why.
    async fn finish_boot(&self, vm: Arc<Vm>, ready: Option<ReadyListener>) {
        let id = vm.run.id.clone();
        let since_launch = (chrono::Utc::now() - vm.run.started)
            .to_std()
            .unwrap_or_default();
        let left = self
            .0
            .options
            .boot_timeout
            .saturating_sub(since_launch)
            .max(ADOPTED_BOOT_GRACE);
        let deadline = Instant::now() + left;
        let waited = async {
            match &ready {
                Some(ready) => self.await_agent(&vm, ready, deadline).await,
                None => {
                    tokio::time::sleep_until(deadline.into()).await;
                    Err(proto::ProtoError::Timeout)
                }
            }
        };
        let mut state = vm.state.subscribe();
        let outcome = tokio::select! {
            r = waited => r,
            // Stopped, or a stop came: the boot is over either way.
            _ = state.wait_for(|s| *s != MachineState::Starting) => return,
        };
        drop(ready);
        match outcome {
            Ok(readiness) => {
                learn_boot(&vm, readiness).await;
                console::write_boot_log(&vm.machine_dir);
                sync_clock(&id, &vm.agent_socket()).await;
                vm.state.send_if_modified(|s| {
                    let starting = *s == MachineState::Starting;
                    if starting {
                        *s = MachineState::Running;
                    }
                    starting
                });
                tracing::info!(machine = %id, after = ?since_launch, "the adopted machine finished its boot");
            }
            Err(e) => {
                let reason = format!(
                    "the guest agent did not report ready within {} s of the start, which the service was restarted during ({e}); forced off",
                    self.0.options.boot_timeout.as_secs().max(left.as_secs()),
                );
                tracing::warn!(machine = %id, "{reason}");
                record_stop_reason(&vm.machine_dir, &reason);
                vm.state.send_replace(MachineState::Stopping);
                self.force_stop(&vm).await;
            }
        }
    }

    /// [`Runtime::adopt`] for every directory in `machines`, then ends the VMs that no
    /// machine owns any more (`reap_orphans`); returns the adopted count.
    pub fn adopt_all(&self, machines: &Path) -> usize {
        let Ok(entries) = std::fs::read_dir(machines) else {
            return 0;
        };
        let adopted = entries
            .flatten()
            .filter(|e| e.path().is_dir() && self.adopt(&e.path()))
            .count();
        self.reap_orphans();
        adopted
    }

    /// Ends what runs of VMs no adopted machine owns: a runtime directory whose machine
    /// directory vanished while the service was down (a crash, a hand-removed directory)
    /// still names its VMM and helpers, which are killed (when still the recorded
    /// processes), and the directory goes. Call after adopting every machine.
    fn reap_orphans(&self) {
        let owned: Vec<PathBuf> = self.vms().values().map(|v| v.run.run_dir.clone()).collect();
        let Ok(entries) = std::fs::read_dir(self.0.options.run_dir.join("vm")) else {
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
            // A start cut off before it recorded its VM in `run.json` recorded each process
            // it spawned.
            if let Ok(Some(spawned)) = fsutil::read_json::<Vec<ProcessId>>(&dir.join(SPAWNED_FILE))
            {
                let alive: Vec<ProcessId> = spawned.into_iter().filter(|p| p.alive()).collect();
                if !alive.is_empty() {
                    tracing::info!(dir = %dir.display(), processes = alive.len(), "ending the processes of a start that was cut off");
                    kill_processes(&alive);
                }
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::RuntimeOptions;

    #[derive(Debug)]
    struct NoVmm;

    #[async_trait::async_trait]
    impl crate::runtime::Vmm for NoVmm {
        fn program(&self) -> &Path {
            Path::new("true")
        }
        fn command(&self, _: crate::runtime::vmm::Launch) -> std::process::Command {
            std::process::Command::new("true")
        }
        async fn quit(&self, _: &Path) -> std::io::Result<()> {
            Ok(())
        }
        async fn switch_disk(&self, _: &Path, _: &Path) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_start_cut_off_before_it_recorded_its_vm_leaves_no_process_behind() {
        let root = tempfile::tempdir().unwrap();
        let machines = root.path().join("machines");
        std::fs::create_dir_all(&machines).unwrap();
        let run_dir = root.path().join("run");
        // A helper spawned by a start whose service was killed before `run.json`.
        let dir = run_dir.join("vm").join("0123456789ab");
        std::fs::create_dir_all(&dir).unwrap();
        let mut helper = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .unwrap();
        let id = ProcessId::of(helper.id()).unwrap();
        fsutil::write_json(&dir.join(SPAWNED_FILE), &vec![id]).unwrap();

        let rt = Runtime::with_vmm(RuntimeOptions::new(root.path(), &run_dir), Arc::new(NoVmm));
        assert_eq!(rt.adopt_all(&machines), 0);
        assert!(!id.alive(), "the helper of the cut-off start lives on");
        assert!(helper.try_wait().unwrap().is_some());
        assert!(!dir.exists());
    }
}
