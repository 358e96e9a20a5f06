//! Giving guests' clean page cache back to the host. A guest keeps every file it read in
//! its page cache, and the host cannot tell those pages from any others: they stay in QEMU's
//! memory until the guest frees them. Free pages already go back (virtio-balloon's free-page
//! reporting), so freeing the cache is enough, and only the guest can: its agent drops the
//! clean page cache and compacts the free memory when asked (`Reclaim`).
//!
//! The service asks (a task per service, [`spawn`]) when a machine has been idle for a while
//! (its VM's host CPU under [`IDLE_CPU_PERCENT`] of a core for `idle_after`; asked once per
//! idle spell) and when the host is short of memory (the "some" pressure stall over the last
//! 10 s in `/proc/pressure/memory` at or above `pressure` percent; every running machine,
//! at most every [`PRESSURE_EVERY`]).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use container_agent_proto as proto;

use super::Runtime;

/// When to reclaim; `None` turns a trigger off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    pub idle_after: Option<Duration>,
    /// Percent of time some task stalled on memory over the last 10 s (PSI `some avg10`).
    pub pressure: Option<f64>,
}

/// How often the machines are looked at.
const TICK: Duration = Duration::from_secs(10);
/// A VM under this much host CPU (percent of one core) is idle. An idle guest under software
/// emulation still costs a few percent in timer interrupts.
const IDLE_CPU_PERCENT: f64 = 5.0;
/// Reclaims for host pressure are at least this far apart.
const PRESSURE_EVERY: Duration = Duration::from_secs(60);
/// How long a guest has to drop its cache.
const RECLAIM_TIMEOUT: Duration = Duration::from_secs(30);

/// One VM's idle spell.
#[derive(Debug, Default)]
struct Idle {
    /// CPU time at the previous tick; `None` before the first.
    cpu_ns: Option<u64>,
    since: Option<Instant>,
    /// Reclaimed in this spell already.
    done: bool,
    /// The reclaim's own CPU time lands in the next tick: it does not end the spell.
    ignore_next: bool,
}

impl Idle {
    /// Takes this tick's CPU time (`elapsed` since the previous one); true when the VM has
    /// been idle for `after` and was not reclaimed in this spell yet.
    fn tick(&mut self, cpu_ns: u64, now: Instant, elapsed: Duration, after: Duration) -> bool {
        let previous = self.cpu_ns.replace(cpu_ns);
        if std::mem::take(&mut self.ignore_next) {
            return false;
        }
        let busy = match previous {
            Some(p) => {
                cpu_ns.saturating_sub(p) as f64 * 100.0 / elapsed.as_nanos().max(1) as f64
                    >= IDLE_CPU_PERCENT
            }
            None => true,
        };
        if busy {
            *self = Idle {
                cpu_ns: Some(cpu_ns),
                ..Idle::default()
            };
            return false;
        }
        let since = *self.since.get_or_insert(now);
        if self.done || now.duration_since(since) < after {
            return false;
        }
        self.done = true;
        self.ignore_next = true;
        true
    }
}

/// The host's memory pressure: `some avg10` of `/proc/pressure/memory`, in percent.
fn host_pressure(text: &str) -> Option<f64> {
    let some = text.lines().find(|l| l.starts_with("some "))?;
    some.split_whitespace()
        .find_map(|f| f.strip_prefix("avg10="))?
        .parse()
        .ok()
}

/// Starts the reclaim task of a runtime; it ends with the service.
pub fn spawn(runtime: Runtime, policy: Policy) {
    if policy.idle_after.is_none() && policy.pressure.is_none() {
        return;
    }
    tokio::spawn(async move {
        let mut idle: HashMap<String, Idle> = HashMap::new();
        let mut last_pressure: Option<Instant> = None;
        let mut last_tick = Instant::now();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = Instant::now();
            let elapsed = now.duration_since(last_tick);
            last_tick = now;
            let ids = runtime.running_ids();
            idle.retain(|id, _| ids.contains(id));
            let pressured = policy.pressure.is_some_and(|limit| {
                std::fs::read_to_string("/proc/pressure/memory")
                    .ok()
                    .and_then(|t| host_pressure(&t))
                    .is_some_and(|p| p >= limit)
            }) && last_pressure
                .is_none_or(|t| now.duration_since(t) >= PRESSURE_EVERY);
            if pressured {
                last_pressure = Some(now);
                tracing::info!("the host is short of memory: machines give their page cache back");
            }
            for id in ids {
                let Some(cpu_ns) = runtime.cpu_time(&id) else {
                    continue;
                };
                let spell = idle.entry(id.clone()).or_default();
                let idle_now = policy
                    .idle_after
                    .is_some_and(|after| spell.tick(cpu_ns, now, elapsed, after));
                if idle_now || pressured {
                    if idle_now {
                        tracing::info!(machine = %id, "idle: its page cache goes back to the host");
                    }
                    reclaim(&runtime, &id).await;
                }
            }
        }
    });
}

async fn reclaim(runtime: &Runtime, id: &str) {
    let Ok(socket) = runtime.agent_socket(id) else {
        return;
    };
    let ask = async {
        proto::client::AgentClient::connect(&socket, proto::PORT)
            .await?
            .reclaim()
            .await
    };
    match tokio::time::timeout(RECLAIM_TIMEOUT, ask).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(machine = %id, error = %e, "could not reclaim"),
        Err(_) => tracing::debug!(machine = %id, "the guest did not reclaim in time"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn an_idle_spell_reclaims_once_after_its_length_and_a_busy_tick_starts_over() {
        let t0 = Instant::now();
        let after = 20 * S;
        let mut idle = Idle::default();
        let tick = 10 * S;
        // 1% of a core per tick is idle; 50% is busy.
        let (quiet, busy) = (tick.as_nanos() as u64 / 100, tick.as_nanos() as u64 / 2);
        let mut cpu = 0;
        let mut at = t0;
        let mut step = |idle: &mut Idle, used: u64| {
            cpu += used;
            at += tick;
            idle.tick(cpu, at, tick, after)
        };
        assert!(!step(&mut idle, 0), "the first tick has nothing to compare");
        assert!(!step(&mut idle, quiet), "idle since now");
        assert!(!step(&mut idle, quiet), "10 s idle");
        assert!(step(&mut idle, quiet), "20 s idle: reclaim");
        assert!(
            !step(&mut idle, busy),
            "the reclaim's own work does not count"
        );
        assert!(!step(&mut idle, quiet), "once per spell");
        assert!(!step(&mut idle, quiet));
        assert!(!step(&mut idle, busy), "busy: the spell ends");
        assert!(!step(&mut idle, quiet));
        assert!(!step(&mut idle, quiet));
        assert!(step(&mut idle, quiet), "a new spell reclaims again");
    }

    #[test]
    fn pressure_is_read_from_psi() {
        let text = "some avg10=12.50 avg60=3.00 avg300=1.00 total=123\n\
                    full avg10=1.00 avg60=0.00 avg300=0.00 total=45\n";
        assert_eq!(host_pressure(text), Some(12.5));
        assert_eq!(host_pressure("garbage"), None);
    }
}
