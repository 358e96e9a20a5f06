//! The test process's network namespace: services, registries and the traffic tests send to
//! machines live in it, never on the host's network (docs/CONTRIBUTING.md, network rule).

use std::path::Path;
use std::process::Command;

use crate::run_ok;

/// The network namespace of this test process, made on first use: its services (and so their
/// machine bridges, taps and NAT), its registries and the traffic tests send to machines live
/// in it, never on the host's network. Namespaces of test processes that died are removed.
pub fn netns() -> &'static str {
    static NETNS: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NETNS.get_or_init(|| {
        if let Ok(entries) = std::fs::read_dir("/run/netns") {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                let pid = name
                    .strip_prefix("ct-e2e-")
                    .and_then(|p| p.parse::<i32>().ok());
                if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
                    let _ = Command::new("ip").args(["netns", "delete", &name]).status();
                }
            }
        }
        let name = format!("ct-e2e-{}", std::process::id());
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        run_ok(Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"]));
        name
    })
}

/// Moves the calling thread (only) into [`netns`]; sockets it makes afterwards live there.
pub fn enter_netns() {
    let ns = std::fs::File::open(format!("/run/netns/{}", netns())).expect("open the namespace");
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("enter the namespace");
}

/// `program` run inside [`netns`].
pub fn in_netns(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", netns()]).arg(program);
    c
}
