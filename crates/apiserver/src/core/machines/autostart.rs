//! Autostart: machines made with `--autostart` (or `set autostart=on`) are booted when the
//! service starts (after a host reboot: the service is a systemd unit), and booted again
//! when their VM dies unexpectedly (crashed or killed: the guest did not power itself off
//! or reboot), after a back-off that doubles with each death within [`BACKOFF_WINDOW`] (1 s,
//! 2 s, … at most [`MAX_BACKOFF`]). Never a machine stopped on purpose: a `stop` ends the
//! VM as asked (no death is reported), a power-off inside the guest is its own choice, and a
//! stop asked during the back-off wins. The reboot policy's limit applies as well: more than
//! five unexpected ends within two minutes leave it stopped.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use container_api::machine::MachineState;
use container_api::system::EventAction;

use crate::core::Core;
use crate::core::ports::{Death, Reboot};

/// The longest wait before booting a machine whose VM died again.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Deaths further apart than this do not lengthen the back-off.
const BACKOFF_WINDOW: Duration = Duration::from_secs(600);

/// Each autostart machine's recent unexpected deaths.
#[derive(Debug, Default)]
pub(in crate::core) struct Deaths {
    inner: std::sync::Mutex<HashMap<String, Vec<Instant>>>,
}

impl Deaths {
    /// How long to wait before booting `name` again, counting this death.
    fn backoff(&self, name: &str, at: Instant) -> Duration {
        let mut all = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let recent = all.entry(name.to_string()).or_default();
        recent.retain(|t| at.saturating_duration_since(*t) < BACKOFF_WINDOW);
        recent.push(at);
        let doublings = u32::try_from(recent.len() - 1).unwrap_or(u32::MAX).min(6);
        Duration::from_secs(1 << doublings).min(MAX_BACKOFF)
    }
}

impl Core {
    /// Boots every stopped machine marked autostart, each under its lock; failures are
    /// logged. Call once at service start, after running machines were adopted.
    pub fn autostart_all(&self) {
        let core = self.clone();
        tokio::spawn(async move {
            let Ok(records) = core.state.machines.list() else {
                return;
            };
            for record in records.into_iter().filter(|r| r.autostart) {
                let _guard = core.state.locks.lock(&record.name).await;
                if core.state.vms.state(&record.name) != MachineState::Stopped {
                    continue;
                }
                tracing::info!(machine = %record.name, "autostart: booting");
                if let Err(e) = core.boot(&record).await {
                    tracing::warn!(machine = %record.name, error = %e.message, "autostart: the machine did not boot");
                }
            }
        });
    }

    /// A VM ended while running, unasked: says so on the events stream, and boots an
    /// autostart machine that crashed or was killed again after its back-off.
    pub(in crate::core) async fn after_death(&self, death: Death) {
        let at = Instant::now();
        let Ok(record) = self.state.machines.get(&death.name) else {
            return;
        };
        let detail = match death.clean {
            true => "the guest powered off or rebooted",
            false => "the VM ended unexpectedly",
        };
        self.emit(
            record.owner_uid,
            &death.name,
            EventAction::Died,
            Some(detail.into()),
        );
        if !record.autostart || death.clean {
            return;
        }
        let wait = self.state.deaths.backoff(&death.name, at);
        tracing::info!(machine = %death.name, wait_s = wait.as_secs(), "autostart: the VM died; booting it again after a back-off");
        tokio::time::sleep(wait).await;
        let _guard = self.state.locks.lock(&death.name).await;
        // Removed, or its autostart turned off, meanwhile.
        let Ok(record) = self.state.machines.get(&death.name) else {
            return;
        };
        if !record.autostart || self.state.vms.state(&death.name) != MachineState::Stopped {
            return;
        }
        let reboot = Reboot {
            name: death.name.clone(),
            at,
        };
        if let Err(why) = self.state.reboots.boot_again(&reboot) {
            tracing::warn!(machine = %death.name, "autostart: left stopped: {why}");
            return;
        }
        if let Err(e) = self.boot(&record).await {
            tracing::warn!(machine = %death.name, error = %e.message, "autostart: booting again failed");
        }
    }
}
