//! What runs the service: a systemd unit (and whether its socket was handed over), the CLI's
//! `container system start`, or a command line of its own. Detected once at start, reported
//! by `system status`, so a user knows whether to use `systemctl` or `container system`.

use std::sync::OnceLock;

/// The environment variable the CLI sets on a service it starts in the background.
pub const STARTED_BY_ENV: &str = "CONTAINER_STARTED_BY";

static RUN_BY: OnceLock<String> = OnceLock::new();

/// Records how this process runs; `socket_activated` when systemd passed the listening socket.
pub fn detect(socket_activated: bool) {
    let described = describe(
        std::env::var_os("INVOCATION_ID").is_some(),
        unit_of_this_process().as_deref(),
        socket_activated,
        std::env::var(STARTED_BY_ENV).ok().as_deref(),
    );
    let _ = RUN_BY.set(described);
}

/// How the service runs, for `system status` (empty before [`detect`]).
pub fn run_by() -> String {
    RUN_BY.get().cloned().unwrap_or_default()
}

/// The systemd unit whose cgroup holds this process (`…/container-apiserver.service`).
fn unit_of_this_process() -> Option<String> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    cgroup
        .lines()
        .filter_map(|l| l.rsplit('/').next())
        .find(|leaf| leaf.ends_with(".service"))
        .map(str::to_string)
}

fn describe(
    under_systemd: bool,
    unit: Option<&str>,
    socket_activated: bool,
    started_by: Option<&str>,
) -> String {
    if under_systemd {
        let unit = unit.unwrap_or("unknown unit");
        let activation = if socket_activated {
            ", socket-activated"
        } else {
            ""
        };
        return format!("systemd ({unit}{activation})");
    }
    if socket_activated {
        return "socket activation (LISTEN_FDS) outside systemd".into();
    }
    match started_by {
        Some("cli") => "the CLI (`container system start`), in the background".into(),
        _ => "its own command line (not under systemd)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn says_which_manager_runs_the_service() {
        assert_eq!(
            describe(true, Some("container-apiserver.service"), true, None),
            "systemd (container-apiserver.service, socket-activated)"
        );
        assert_eq!(
            describe(
                true,
                Some("container-apiserver.service"),
                false,
                Some("cli")
            ),
            "systemd (container-apiserver.service)"
        );
        assert!(describe(false, None, true, None).starts_with("socket activation"));
        assert!(describe(false, None, false, Some("cli")).starts_with("the CLI"));
        assert!(describe(false, None, false, None).starts_with("its own command line"));
    }
}
