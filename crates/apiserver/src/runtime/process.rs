//! Processes the runtime started, known by pid *and* start time (field 22 of
//! `/proc/PID/stat`), so a pid the kernel reused for another process is never signalled or
//! mistaken for ours. Exits are watched through a pidfd, which works for processes that are
//! not our children (a QEMU adopted after a service restart); where pidfds are unavailable,
//! `/proc` is polled.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A process: pid and start time in clock ticks since boot. Serialised as `[pid, ticks]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessId(pub i32, pub u64);

impl ProcessId {
    /// The running process with this pid, if there is one.
    pub fn of(pid: u32) -> Option<Self> {
        let pid = i32::try_from(pid).ok()?;
        start_ticks(pid).map(|t| ProcessId(pid, t))
    }

    pub fn pid(self) -> i32 {
        self.0
    }

    /// True while the process runs (a zombie counts as exited).
    pub fn alive(self) -> bool {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", self.0)) else {
            return false;
        };
        match parse_stat(&stat) {
            Some((state, ticks)) => ticks == self.1 && state != 'Z' && state != 'X',
            None => false,
        }
    }

    /// Sends `signal` if the process is still this one.
    pub fn signal(self, signal: nix::sys::signal::Signal) {
        // Through a pidfd opened after checking identity, the signal cannot reach a later
        // process that reused the pid.
        let Some(pid) = rustix::process::Pid::from_raw(self.0) else {
            return;
        };
        match rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) {
            Ok(fd) => {
                if self.alive()
                    && let Some(sig) = rustix::process::Signal::from_named_raw(signal as i32)
                {
                    let _ = rustix::process::pidfd_send_signal(&fd, sig);
                }
            }
            Err(_) => {
                if self.alive() {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0), signal);
                }
            }
        }
    }

    /// SIGKILL if the process is still this one.
    pub fn kill(self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
    }

    /// Returns when the process has exited (it may remain a zombie until its parent reaps it).
    pub async fn exited(self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.0)
            && let Ok(fd) = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
        {
            // Identity is checked after opening, so the fd is known to be this process.
            if !self.alive() {
                return;
            }
            let registered = super::sys::register_pidfd(fd);
            if let Ok(fd) = registered {
                // A pidfd becomes readable when its process exits.
                let _ = fd.readable().await;
                return;
            }
        }
        while self.alive() {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// (state, start ticks) from the text of `/proc/PID/stat`. The command name may hold spaces
/// and parentheses, so fields are counted after the last `)`.
fn parse_stat(stat: &str) -> Option<(char, u64)> {
    let after = stat.get(stat.rfind(')')? + 1..)?;
    let mut fields = after.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // Field 3 is the state; field 22 the start time.
    let ticks = fields.nth(18)?.parse().ok()?;
    Some((state, ticks))
}

fn start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat).map(|(_, t)| t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_state_and_start_time_whatever_the_command_name() {
        let stat =
            "1234 (a) b (c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 100";
        assert_eq!(parse_stat(stat), Some(('S', 987654)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[tokio::test]
    async fn a_dead_process_is_not_alive_and_a_reused_identity_is_not_ours() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let id = ProcessId::of(child.id()).unwrap();
        assert!(id.alive());
        assert!(
            !ProcessId(id.0, id.1 + 1).alive(),
            "another start time is another process"
        );
        id.kill();
        tokio::time::timeout(Duration::from_secs(5), id.exited())
            .await
            .expect("the exit is seen");
        assert!(!id.alive(), "a killed (zombie) process is not alive");
        child.wait().unwrap();
        assert!(!id.alive());
    }
}
