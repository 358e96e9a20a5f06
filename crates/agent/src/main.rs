//! `container-agent`: `/init` of every machine's initramfs.
//!
//! As PID 1 it readies the machine (see [`boot`]), then forks: the parent execs the image's
//! own `/sbin/init`, which so becomes PID 1 of the machine, and the child stays on as a daemon
//! serving the host over vsock (see [`server`]). If anything fails before init starts, the
//! error goes to the console (the boot log) and the VM powers off: it never hangs.

mod boot;
mod server;
mod sys;
mod users;

use std::process::ExitCode;
use std::time::Instant;

/// Prints a boot-log line on the console.
macro_rules! log {
    ($($arg:tt)*) => {{
        eprintln!("container-agent: {}", format!($($arg)*));
    }};
}
pub(crate) use log;

/// Errors are sentences with their context prepended, printed once.
pub(crate) type Result<T> = std::result::Result<T, String>;

/// Adds context to any displayable error.
pub(crate) trait Context<T> {
    fn ctx(self, what: impl std::fmt::Display) -> Result<T>;
}

impl<T, E: std::fmt::Display> Context<T> for std::result::Result<T, E> {
    fn ctx(self, what: impl std::fmt::Display) -> Result<T> {
        self.map_err(|e| format!("{what}: {e}"))
    }
}

fn main() -> ExitCode {
    let started = Instant::now();
    if std::process::id() != 1 {
        eprintln!("container-agent: must run as PID 1 of a machine's VM");
        return ExitCode::from(2);
    }
    let Err(e) = boot::run(started);
    log!("boot failed: {e}");
    log!("powering off");
    sys::power_off();
    ExitCode::FAILURE
}
