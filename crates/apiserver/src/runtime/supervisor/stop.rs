//! Stopping a VM: through its agent (the image's init shuts down), else by asking the VMM
//! to quit, else by killing it. The watcher does the cleaning up once the VMM is gone.

use std::time::Duration;

use container_agent_proto as proto;
use container_api::machine::MachineState;

use super::{Runtime, Vm, rewrite_run};
use crate::runtime::RuntimeError;

/// Waited beyond the caller's stop timeout for the agent's own forced power-off.
pub(super) const STOP_GRACE: Duration = Duration::from_secs(5);

impl Runtime {
    /// Shuts a VM down through its agent (`signal` to init, forced after `timeout` and a
    /// grace); kills it when that fails. Idempotent.
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
        let unresponsive = vm.shown() == MachineState::Unresponsive;
        vm.state.send_replace(MachineState::Stopping);
        let stop_by = chrono::Utc::now()
            + chrono::Duration::from_std(timeout + STOP_GRACE).unwrap_or_default();
        if let Err(e) = rewrite_run(&vm, |run| run.stop_by = Some(stop_by)).await {
            tracing::warn!(machine = %id, error = %e, "could not record the stop");
        }
        if unresponsive {
            tracing::debug!(machine = %id, "the guest agent does not answer; forcing the VM off");
        } else if was == MachineState::Starting {
            // The agent has not said it is ready, so it may not be reached safely (see
            // `ReadyListener`), and the image's init has at most just started: there is
            // nothing to stop cleanly yet.
            tracing::debug!(machine = %id, "stopped while booting; forcing the VM off");
        } else if stop_through_agent(&vm, signal, timeout).await {
            return Ok(());
        }
        if self.force_stop(&vm).await {
            Ok(())
        } else {
            Err(RuntimeError::DidNotExit(id.to_string()))
        }
    }

    /// Asks the VMM to quit, then kills it. True once the VM is stopped.
    pub(super) async fn force_stop(&self, vm: &Vm) -> bool {
        if self.0.vmm.quit(&vm.control_socket()).await.is_ok()
            && vm.stopped_within(Duration::from_secs(3)).await
        {
            return true;
        }
        vm.run.qemu.kill();
        vm.stopped_within(Duration::from_secs(10)).await
    }
}

/// Asks the agent to stop the machine through its init; true once the VM is stopped,
/// false (logged) when it has to be forced off.
async fn stop_through_agent(vm: &Vm, signal: Option<i32>, timeout: Duration) -> bool {
    let id = &vm.run.id;
    let asked = async {
        proto::client::AgentClient::connect(&vm.agent_socket(), proto::PORT)
            .await?
            .shutdown(signal, timeout)
            .await
    };
    match tokio::time::timeout(Duration::from_secs(5), asked).await {
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
