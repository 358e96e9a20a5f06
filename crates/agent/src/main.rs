//! `container-agent`: `/init` of every machine's initramfs.
//!
//! As PID 1 it readies the machine (see [`boot`]), then forks: the parent execs the image's
//! own `/sbin/init`, which so becomes PID 1 of the machine, and the child stays on as a daemon
//! serving the host over vsock (see [`server`]). If anything fails before init starts, the
//! error goes to the console (the boot log) and the VM powers off: it never hangs.
//!
//! Failures are `anyhow` errors with context naming the thing and the step; the chain is
//! formatted once, where it is reported: on the console ([`console::log`], here and in the
//! server's session log) or to the host as an `Error` message ([`wire::error`]).

mod boot;
mod console;
mod copy;
mod exec;
mod net;
mod ports;
mod server;
mod ssh_agent;
#[allow(unsafe_code)]
mod sys;
mod users;
mod wire;

use std::process::ExitCode;

use console::log;

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
