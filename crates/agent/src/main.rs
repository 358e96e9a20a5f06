//! `container-agent`: `/init` of every machine's initramfs.
//!
//! As PID 1 it readies the machine (see [`boot`]), then forks: the parent execs the image's
//! own `/sbin/init`, which so becomes PID 1 of the machine, and the child stays on as a daemon
//! serving the host over vsock (see [`server`]). If anything fails before init starts, the
//! error goes to the console (the boot log) and the VM powers off: it never hangs.

mod boot;
mod copy;
mod exec;
mod net;
mod server;
#[allow(unsafe_code)]
mod sys;
mod users;

use std::process::ExitCode;

/// Prints a boot-log line on the console, stamped with the time since the kernel started
/// (comparable with the kernel's own stamps).
macro_rules! log {
    ($($arg:tt)*) => {{
        eprintln!("container-agent: {} [{:.3}s]", format!($($arg)*), $crate::sys::boot_time());
    }};
}
pub(crate) use log;

fn main() -> ExitCode {
    if std::process::id() != 1 {
        eprintln!(
            "container-agent: must run as PID 1 of a machine's VM (it is the initramfs's /init)"
        );
        return ExitCode::from(2);
    }
    let Err(e) = boot::run();
    log!("boot failed: {e:#}");
    log!("powering off");
    sys::power_off();
    ExitCode::FAILURE
}
