//! The service under systemd: when systemd is the init system and the
//! `container-apiserver.service` unit is installed (scripts/install.sh puts it there),
//! `container system start|stop|logs` go through `systemctl` and `journalctl`, so systemd
//! stays the one owner of the process; otherwise the CLI runs the service itself.

use std::process::Command;

use anyhow::Context;

/// The service's unit.
pub const UNIT: &str = "container-apiserver.service";
/// Its socket unit: the first connection to the API socket starts the service.
pub const SOCKET_UNIT: &str = "container-apiserver.socket";

/// Whether systemd is the running init system (sd_booted(3)'s test).
pub fn booted() -> bool {
    std::path::Path::new("/run/systemd/system").is_dir()
}

/// Whether systemd runs and knows the service's unit: then it manages the service.
pub fn manages_service() -> bool {
    booted() && load_state(UNIT).as_deref() == Some("loaded")
}

/// `systemctl show -p LoadState`: `loaded`, `not-found`, …; `None` when systemctl fails.
fn load_state(unit: &str) -> Option<String> {
    let out = Command::new("systemctl")
        .args(["show", "--property=LoadState", "--value", unit])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `systemctl VERB UNIT…`, failing with systemctl's own message.
pub fn systemctl(verb: &str, units: &[&str]) -> anyhow::Result<()> {
    let status = Command::new("systemctl")
        .arg(verb)
        .args(units)
        .status()
        .context("running systemctl")?;
    if !status.success() {
        anyhow::bail!(
            "`systemctl {verb} {}` failed ({status}); see `journalctl -u {UNIT}`",
            units.join(" ")
        );
    }
    Ok(())
}

/// Shows the unit's journal (`-f`: and follows it).
pub fn journal(follow: bool) -> anyhow::Result<()> {
    let mut command = Command::new("journalctl");
    command.args(["--unit", UNIT, "--no-pager", "--output", "short-iso"]);
    if follow {
        command.arg("--follow");
    }
    let status = command.status().context("running journalctl")?;
    if !status.success() {
        anyhow::bail!(
            "cannot read the journal of {UNIT} ({status}); reading it needs root or the systemd-journal group"
        );
    }
    Ok(())
}
