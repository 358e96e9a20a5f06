//! Lifecycle events of machines (`system events`): the core emits one at each step of a
//! machine's life (created, booting, running, stopping, stopped, died, deleted, snapshot,
//! clone, renamed) on one broadcast channel, in the order the steps happen; each reader
//! gets the events of the machines its caller owns (root: every machine's), optionally of
//! one machine. A reader too slow to keep up skips what it missed rather than holding the
//! service back.

use container_api::system::{Event, EventAction};
use tokio::sync::broadcast;

use super::{Caller, Core};

/// Events kept for a slow reader before it skips.
const BACKLOG: usize = 1024;

/// The channel every event goes through, with each event's owner.
#[derive(Debug)]
pub(super) struct Events {
    tx: broadcast::Sender<(u32, Event)>,
}

impl Default for Events {
    fn default() -> Self {
        Events {
            tx: broadcast::channel(BACKLOG).0,
        }
    }
}

/// A caller's stream of events.
#[derive(Debug)]
pub struct EventStream {
    rx: broadcast::Receiver<(u32, Event)>,
    caller: Caller,
    machine: Option<String>,
}

impl EventStream {
    /// The next event the caller may see; `None` once the service goes away.
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            match self.rx.recv().await {
                Ok((owner, event)) => {
                    let mine = self.caller.is_root() || owner == self.caller.uid;
                    let wanted = self.machine.as_ref().is_none_or(|m| *m == event.machine);
                    if mine && wanted {
                        return Some(event);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(missed, "an events reader fell behind");
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

impl Core {
    /// Tells the readers of `owner`'s events that `action` happened to `machine`.
    pub(super) fn emit(
        &self,
        owner: u32,
        machine: &str,
        action: EventAction,
        detail: Option<String>,
    ) {
        let event = Event {
            time: chrono::Utc::now(),
            machine: machine.to_string(),
            action,
            detail,
        };
        // Nobody listening is not an error.
        let _ = self.state.events.tx.send((owner, event));
    }

    /// The caller's events from now on, of one machine or all.
    pub(super) fn events(&self, caller: &Caller, machine: Option<String>) -> EventStream {
        EventStream {
            rx: self.state.events.tx.subscribe(),
            caller: *caller,
            machine,
        }
    }

    /// Reports VMs that ended without a stop asked for, and boots the autostart ones again
    /// (`machines/autostart`). Runs until the runtime goes away.
    pub fn follow_deaths(&self) {
        let core = self.clone();
        let mut deaths = self.state.vms.deaths();
        tokio::spawn(async move {
            loop {
                match deaths.recv().await {
                    Ok(death) => {
                        let core = core.clone();
                        // The back-off of an autostart machine must not hold the others up.
                        tokio::spawn(async move { core.after_death(death).await });
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }
}
