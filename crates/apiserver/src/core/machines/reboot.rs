//! Whether a machine whose guest rebooted itself is booted again, and the task that does it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use container_api::machine::MachineState;

use crate::core::Core;
use crate::core::ports::Reboot;

/// How many times a guest may reboot within [`REBOOT_WINDOW`] and be booted again each time.
pub(in crate::core) const REBOOT_LIMIT: usize = 5;
/// See [`REBOOT_LIMIT`].
pub(in crate::core) const REBOOT_WINDOW: Duration = Duration::from_secs(120);

/// Whether a machine whose guest rebooted is booted again. Not when a stop was asked for
/// after the VM ended (the stop found it stopped, and must not be undone), nor once it has
/// rebooted more than [`REBOOT_LIMIT`] times within [`REBOOT_WINDOW`] since it was last
/// started by request: a guest caught in a reboot loop is left stopped rather than spinning.
#[derive(Debug, Default)]
pub(in crate::core) struct RebootPolicy {
    inner: std::sync::Mutex<RebootHistory>,
}

#[derive(Debug, Default)]
struct RebootHistory {
    /// When a stop of each machine was last asked for.
    stops: HashMap<String, Instant>,
    /// Each machine's reboots since its last start by request, within the window.
    recent: HashMap<String, std::collections::VecDeque<Instant>>,
}

impl RebootPolicy {
    fn history(&self) -> std::sync::MutexGuard<'_, RebootHistory> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(in crate::core) fn stop_asked(&self, name: &str) {
        self.history()
            .stops
            .insert(name.to_string(), Instant::now());
    }

    pub(in crate::core) fn start_asked(&self, name: &str) {
        self.history().recent.remove(name);
    }

    pub(in crate::core) fn forget(&self, name: &str) {
        let mut h = self.history();
        h.stops.remove(name);
        h.recent.remove(name);
    }

    /// `Err` says why the machine stays stopped.
    pub(in crate::core) fn boot_again(&self, reboot: &Reboot) -> Result<(), String> {
        let mut h = self.history();
        if h.stops.get(&reboot.name).is_some_and(|t| *t >= reboot.at) {
            return Err("a stop was asked for after it went down".into());
        }
        let recent = h.recent.entry(reboot.name.clone()).or_default();
        recent.retain(|t| reboot.at.saturating_duration_since(*t) < REBOOT_WINDOW);
        recent.push_back(reboot.at);
        if recent.len() > REBOOT_LIMIT {
            return Err(format!(
                "it rebooted {} times within {} s; `container machine start {}` boots it again",
                recent.len(),
                REBOOT_WINDOW.as_secs(),
                reboot.name
            ));
        }
        Ok(())
    }
}

impl Core {
    /// Boots machines again whose guest rebooted itself, as `sudo reboot` does on any
    /// machine: QEMU runs with `-no-reboot`, so a reboot inside ends the VM, and the runtime
    /// reports it. Runs until the runtime goes away.
    pub fn follow_reboots(&self) {
        let core = self.clone();
        let mut reboots = self.state.vms.reboots();
        tokio::spawn(async move {
            loop {
                match reboots.recv().await {
                    Ok(reboot) => core.boot_after_reboot(&reboot).await,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "missed reboots of machines; they stay stopped");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }

    async fn boot_after_reboot(&self, reboot: &Reboot) {
        let name = reboot.name.as_str();
        let _guard = self.state.locks.lock(name).await;
        // Removed, or started by someone else, while the guest went down.
        let Ok(record) = self.state.machines.get(name) else {
            return;
        };
        if self.state.vms.state(name) != MachineState::Stopped {
            return;
        }
        if let Err(why) = self.state.reboots.boot_again(reboot) {
            tracing::warn!(machine = name, "the guest rebooted; left stopped: {why}");
            return;
        }
        tracing::info!(machine = name, "the guest rebooted; booting it again");
        if let Err(e) = self.boot(&record).await {
            tracing::warn!(
                machine = name,
                "booting the machine again after its reboot failed: {}",
                e.message
            );
        }
    }
}
