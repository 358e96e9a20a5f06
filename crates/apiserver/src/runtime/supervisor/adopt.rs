//! Adoption at service start: the VMs whose VMM outlived the service are watched again;
//! what is left of the others (their helpers, runtime directories, `run.json`) goes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use container_api::machine::MachineState;
use tokio::sync::watch;

use super::{RUN_FILE, RunState, Runtime, Vm, cleanup, kill_all};
use crate::fsutil;

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
        let vm = Arc::new(Vm {
            machine_dir: machine_dir.to_path_buf(),
            run,
            state: watch::Sender::new(MachineState::Running),
            children: Mutex::new(Vec::new()),
        });
        self.vms().insert(vm.run.id.clone(), vm.clone());
        self.watch(vm);
        true
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
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}
