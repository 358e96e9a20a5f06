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
            + chrono::Duration::from_std(ASK_LIMIT * ASKS + timeout + STOP_GRACE)
                .unwrap_or_default();
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

/// How long the agent has to take a stop request, and how often it is asked: a connection
/// to an emulated guest on a loaded host is now and then lost, and forcing the machine off
/// for that would cost the clean shutdown the user asked for.
const ASK_LIMIT: Duration = Duration::from_secs(4);
const ASKS: u32 = 2;

/// Asks the agent to stop the machine through its init; true once the VM is stopped,
/// false (logged) when it has to be forced off.
async fn stop_through_agent(vm: &Vm, signal: Option<i32>, timeout: Duration) -> bool {
    let ask = || async {
        proto::client::AgentClient::connect(&vm.agent_socket(), proto::PORT)
            .await?
            .shutdown(signal, timeout)
            .await
    };
    ask_to_stop(&vm.run.id, ask, |limit| vm.stopped_within(limit), timeout).await
}

/// [`stop_through_agent`]'s rule, apart from the agent and the VM: asks up to [`ASKS`]
/// times, [`ASK_LIMIT`] each, then waits `timeout` and the grace for the VM to stop
/// (`stopped_within`). True once stopped.
async fn ask_to_stop<A, E, S>(
    id: &str,
    ask: impl Fn() -> A,
    stopped_within: impl Fn(Duration) -> S,
    timeout: Duration,
) -> bool
where
    A: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
    S: Future<Output = bool>,
{
    for asked in 1..=ASKS {
        let why = match tokio::time::timeout(ASK_LIMIT, ask()).await {
            Ok(Ok(())) => {
                tracing::debug!(machine = %id, "the guest agent took the stop request");
                if stopped_within(timeout + STOP_GRACE).await {
                    return true;
                }
                tracing::warn!(machine = %id, "the machine did not power off in time; forcing it off");
                return false;
            }
            Ok(Err(e)) => format!("did not take the stop request ({e})"),
            Err(_) => "did not answer the stop request".to_string(),
        };
        if stopped_within(Duration::ZERO).await {
            // A request taken whose answer was lost: the machine went down meanwhile.
            return true;
        }
        match asked < ASKS {
            true => tracing::warn!(machine = %id, "the guest agent {why}; asking again"),
            false => tracing::warn!(machine = %id, "the guest agent {why}; forcing the VM off"),
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// An agent that answers the `answer_at`th request (counting from 1) and loses the
    /// others without a word, as a connection lost on a loaded host does; the VM stops
    /// `stops_after` once a request is taken. Returns the verdict and the requests made.
    async fn stop_with(answer_at: u32, stops_after: Option<Duration>) -> (bool, u32) {
        let asked = AtomicU32::new(0);
        let taken = std::sync::Mutex::new(None::<tokio::time::Instant>);
        let ask = || async {
            let n = asked.fetch_add(1, Ordering::SeqCst) + 1;
            if n != answer_at {
                std::future::pending::<()>().await;
            }
            *taken.lock().unwrap() = Some(tokio::time::Instant::now());
            Ok::<(), String>(())
        };
        let stopped_within = |limit: Duration| {
            let down = taken
                .lock()
                .unwrap()
                .zip(stops_after)
                .map(|(at, after)| at + after);
            async move {
                let now = tokio::time::Instant::now();
                let Some(down) = down else {
                    tokio::time::sleep(limit).await;
                    return false;
                };
                tokio::time::sleep_until(down.min(now + limit)).await;
                tokio::time::Instant::now() >= down
            }
        };
        let ok = ask_to_stop("m", ask, stopped_within, Duration::from_secs(2)).await;
        (ok, asked.load(Ordering::SeqCst))
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_stop_request_is_asked_again_before_the_machine_is_forced_off() {
        let clean = Some(Duration::from_secs(1));
        assert_eq!(stop_with(1, clean).await, (true, 1), "taken at once");
        assert_eq!(
            stop_with(2, clean).await,
            (true, 2),
            "the first request lost"
        );
        assert_eq!(stop_with(3, clean).await, (false, 2), "never taken: forced");
        let late = Some(STOP_GRACE + Duration::from_secs(10));
        assert_eq!(
            stop_with(1, late).await,
            (false, 1),
            "taken, never powered off"
        );
    }
}
