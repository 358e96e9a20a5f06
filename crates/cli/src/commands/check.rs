//! `container system check`: can this host run machines, and if not, what to do. Each check
//! is a line (ok, warn or fail) with its finding and, unless ok, the fix. It asks the service
//! when it answers (kernel, configured paths, network, limits) and looks at the host itself
//! otherwise, so it also works when the service cannot start. The exit code is 0 when
//! machines can run (warnings allowed), 1 when a check failed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use clap::Args;
use container_api::system::{Property, SystemStatus};
use container_api::{Client, ExitCode, paths};
use serde::Serialize;

use crate::exit::failed;
use crate::output::{self, Format};
use crate::systemd;

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Output format: table (a line per check, with what to do) or a document.
    #[arg(long, value_enum, default_value_t)]
    format: Format,
}

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Ok,
    /// Machines run, but worse than they could (slower, or something to look at).
    Warn,
    /// Machines cannot run until this is fixed.
    Fail,
}

/// One finding.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Level,
    pub detail: String,
    /// What to do; none when there is nothing to do.
    pub fix: Option<String>,
}

/// The whole report, as `--format json` prints it.
#[derive(Debug, Serialize)]
pub struct Report {
    /// False when any check failed.
    pub machines_can_run: bool,
    pub checks: Vec<Check>,
}

fn check(name: &'static str, status: Level, detail: impl Into<String>) -> Check {
    Check {
        name,
        status,
        detail: detail.into(),
        fix: None,
    }
}

impl Check {
    fn fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }
}

/// What the running service says about itself.
#[derive(Debug, Default)]
struct ServiceView {
    status: Option<SystemStatus>,
    properties: Vec<Property>,
}

impl ServiceView {
    fn property(&self, key: &str) -> Option<String> {
        self.properties
            .iter()
            .find(|p| p.key == key)
            .map(|p| match &p.value {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            })
    }
}

pub async fn run(args: CheckArgs) -> anyhow::Result<u8> {
    let view = ask_service().await;
    let report = gather(&view);
    match args.format {
        Format::Table => print!("{}", render(&report)),
        other => print!("{}", output::render_value(&report, other)?),
    }
    if report.machines_can_run {
        Ok(0)
    } else {
        let failed_checks: Vec<&str> = report
            .checks
            .iter()
            .filter(|c| c.status == Level::Fail)
            .map(|c| c.name)
            .collect();
        Err(failed(
            ExitCode::Failure,
            format!(
                "machines cannot run on this host until these are fixed: {}",
                failed_checks.join(", ")
            ),
        ))
    }
}

/// The service's status and properties, without starting it and without waiting long.
async fn ask_service() -> ServiceView {
    let client = Client::new(paths::socket());
    let wait = Duration::from_secs(3);
    let status = tokio::time::timeout(wait, client.get::<SystemStatus>("/system/status"))
        .await
        .ok()
        .and_then(Result::ok);
    let properties = match status {
        Some(_) => tokio::time::timeout(wait, client.get::<Vec<Property>>("/system/properties"))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default(),
        None => Vec::new(),
    };
    ServiceView { status, properties }
}

fn gather(view: &ServiceView) -> Report {
    let mut checks = vec![service(view), kvm(view)];
    checks.push(program(
        view,
        "qemu",
        "runtime.qemu",
        "qemu-system-x86_64",
        &["--version"],
        "install QEMU: `sudo apt-get install qemu-system-x86` (scripts/install-deps.sh does it)",
    ));
    if let Some(c) = microvm(view) {
        checks.push(c);
    }
    checks.push(program(
        view,
        "qemu-img",
        "",
        "qemu-img",
        &["--version"],
        "install `sudo apt-get install qemu-utils`",
    ));
    checks.push(program(
        view,
        "virtiofsd",
        "runtime.virtiofsd",
        "virtiofsd",
        &["--version"],
        "install it: `sudo cargo install --root /usr/local virtiofsd` (needs libseccomp-dev, libcap-ng-dev; scripts/install-deps.sh does it)",
    ));
    checks.push(program(
        view,
        "vhost-device-vsock",
        "runtime.vhost-device-vsock",
        "vhost-device-vsock",
        &["--version"],
        "install it: `sudo cargo install --root /usr/local vhost-device-vsock` (scripts/install-deps.sh does it)",
    ));
    checks.push(program(
        view,
        "mkfs.ext4",
        "",
        "mkfs.ext4",
        &["-V"],
        "install `sudo apt-get install e2fsprogs`",
    ));
    checks.push(program(
        view,
        "nft",
        "",
        "nft",
        &["--version"],
        "install `sudo apt-get install nftables` (machines' NAT and isolation)",
    ));
    checks.push(kernel(view));
    checks.push(tun());
    checks.extend(network(view));
    checks.push(disk(view));
    checks.push(limits(view));
    Report {
        machines_can_run: checks.iter().all(|c| c.status != Level::Fail),
        checks,
    }
}

fn service(view: &ServiceView) -> Check {
    match &view.status {
        Some(s) => check(
            "service",
            Level::Ok,
            format!(
                "running: pid {}, version {}, run by {}",
                s.pid,
                s.version,
                if s.run_by.is_empty() {
                    "an older service"
                } else {
                    &s.run_by
                }
            ),
        ),
        None if systemd::manages_service() => check(
            "service",
            Level::Warn,
            format!("not answering on {}", paths::socket().display()),
        )
        .fix(format!(
            "sudo systemctl start {} {}",
            systemd::SOCKET_UNIT,
            systemd::UNIT
        )),
        None => check(
            "service",
            Level::Warn,
            format!(
                "not running (no answer on {}); the checks below look at the host directly",
                paths::socket().display()
            ),
        )
        .fix("sudo container system start (root's first command starts it too)"),
    }
}

/// What KVM this host offers, read from the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmFacts {
    /// `/sys/module/kvm_pvm`: nested PVM, which hangs a standard guest kernel.
    pub pvm: bool,
    pub device: bool,
    /// Opening `/dev/kvm` read-write failed with this (as the caller).
    pub open_error: Option<String>,
    pub caller_is_root: bool,
}

impl KvmFacts {
    fn probe() -> Self {
        let device = Path::new("/dev/kvm").exists();
        let open_error = device
            .then(|| {
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/kvm")
                    .err()
                    .map(|e| e.to_string())
            })
            .flatten();
        KvmFacts {
            pvm: Path::new("/sys/module/kvm_pvm").exists(),
            device,
            open_error,
            caller_is_root: nix::unistd::geteuid().is_root(),
        }
    }
}

fn kvm(view: &ServiceView) -> Check {
    let mut c = kvm_verdict(&KvmFacts::probe());
    if let Some(s) = &view.status {
        c.detail = format!("{}; the service uses {}", c.detail, s.virtualization);
    }
    c
}

/// KVM: usable, or why not and what machines get instead (TCG works, slower).
pub fn kvm_verdict(f: &KvmFacts) -> Check {
    if f.pvm {
        return check(
            "kvm",
            Level::Warn,
            "/dev/kvm is nested PVM (kvm_pvm is loaded), which cannot run a standard guest kernel: machines run under TCG (software emulation, several times slower)",
        )
        .fix("nothing to do here; on a host with hardware virtualization (or nested VMX/SVM enabled) machines use KVM");
    }
    if !f.device {
        return check(
            "kvm",
            Level::Warn,
            "/dev/kvm is missing: machines run under TCG (software emulation, several times slower)",
        )
        .fix("enable virtualization (VT-x/AMD-V) in the firmware, or nested virtualization for a VM, then `sudo modprobe kvm_intel` or `kvm_amd`");
    }
    match (&f.open_error, f.caller_is_root) {
        (None, _) => check("kvm", Level::Ok, "/dev/kvm opens read-write: machines use KVM"),
        (Some(e), true) => check(
            "kvm",
            Level::Warn,
            format!("/dev/kvm exists but root cannot open it ({e}): machines run under TCG"),
        )
        .fix("check the device's permissions and that no security module denies it (`ls -l /dev/kvm`, `dmesg`)"),
        (Some(_), false) => check(
            "kvm",
            Level::Ok,
            "/dev/kvm exists (you cannot open it, but the service runs as root and does)",
        ),
    }
}

/// A program the service runs: its version, or how to install it.
fn program(
    view: &ServiceView,
    name: &'static str,
    property: &str,
    binary: &str,
    version_args: &[&str],
    install: &str,
) -> Check {
    let configured = (!property.is_empty())
        .then(|| view.property(property))
        .flatten()
        .filter(|v| !v.is_empty() && v != "null");
    let path = match configured {
        Some(p) => Some(PathBuf::from(p)).filter(|p| p.is_file()),
        None => find_program(binary),
    };
    let Some(path) = path else {
        return check(name, Level::Fail, format!("{binary} not found")).fix(install);
    };
    match version_of(&path, version_args) {
        Some(v) => check(name, Level::Ok, format!("{v} ({})", path.display())),
        None => check(
            name,
            Level::Fail,
            format!("{} does not run", path.display()),
        )
        .fix(install),
    }
}

/// The first line a program prints for its version flag (stdout, else stderr).
fn version_of(path: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new(path).args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = if out.stdout.is_empty() {
        out.stderr
    } else {
        out.stdout
    };
    String::from_utf8_lossy(&text)
        .lines()
        .next()
        .map(|l| l.trim().to_string())
}

/// Where the service looks: PATH, the sbin directories, and `~/.cargo/bin` (the caller's and
/// root's), as `runtime::helpers::find_binary` does.
fn find_program(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(
        ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/sbin"]
            .iter()
            .map(PathBuf::from),
    );
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.push(PathBuf::from("/root/.cargo/bin"));
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// QEMU must have the microvm machine type.
fn microvm(view: &ServiceView) -> Option<Check> {
    let configured = view.property("runtime.qemu").filter(|v| !v.is_empty());
    let qemu = configured
        .map(PathBuf::from)
        .or_else(|| find_program("qemu-system-x86_64"))?;
    let out = Command::new(&qemu)
        .args(["-machine", "help"])
        .output()
        .ok()?;
    let has = String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.starts_with("microvm"));
    Some(if has {
        check(
            "qemu microvm",
            Level::Ok,
            "the microvm machine type is there",
        )
    } else {
        check(
            "qemu microvm",
            Level::Fail,
            format!("{} has no microvm machine type", qemu.display()),
        )
        .fix("install a QEMU built with microvm (Debian 12's qemu-system-x86 7.2 has it)")
    })
}

fn kernel(view: &ServiceView) -> Check {
    let configured = view
        .property("kernel.binary")
        .filter(|v| !v.is_empty() && v != "null");
    match &view.status {
        Some(s) => match (&s.kernel, configured) {
            (Some(k), _) => check("kernel", Level::Ok, format!("{} ({})", k.version, k.path)),
            (None, Some(binary)) => check(
                "kernel",
                Level::Ok,
                format!("{binary} (configured under [kernel])"),
            ),
            (None, None) => not_yet_installed(),
        },
        None => {
            let current = paths::root().join("kernels/current.json");
            match std::fs::metadata(&current) {
                Ok(_) => check(
                    "kernel",
                    Level::Ok,
                    format!("installed ({})", current.display()),
                ),
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => check(
                    "kernel",
                    Level::Warn,
                    "unknown: the service is not running and its data directory is root's",
                )
                .fix("run this check as root, or start the service"),
                Err(_) => not_yet_installed(),
            }
        }
    }
}

/// No kernel yet is no failure: the first boot installs the recommended one from the host's
/// package sources, which takes a minute once (or now, with the fix).
fn not_yet_installed() -> Check {
    check(
        "kernel",
        Level::Warn,
        "none installed yet: the first machine to boot installs the recommended one (about a minute, from the host's package sources)",
    )
    .fix("sudo container system kernel set --recommended   # now, instead of at the first boot")
}

fn tun() -> Check {
    if Path::new("/dev/net/tun").exists() {
        check("tun", Level::Ok, "/dev/net/tun is there (machine taps)")
    } else {
        check(
            "tun",
            Level::Fail,
            "/dev/net/tun is missing: machines get no network",
        )
        .fix("sudo modprobe tun (or create machines with --network none)")
    }
}

/// The bridge, forwarding and the NAT table: made with the first running machine, removed
/// with the last, so their absence with no machine running is normal.
fn network(view: &ServiceView) -> Vec<Check> {
    let bridge = view
        .property("network.bridge")
        .unwrap_or_else(|| "container0".into());
    let subnet = view
        .property("network.subnet")
        .unwrap_or_else(|| "192.168.64.0/24".into());
    let mut checks = Vec::new();
    let addr = Command::new("ip")
        .args(["-o", "-4", "addr", "show", "dev", &bridge])
        .output();
    let bridge_up = match addr {
        Ok(out) if out.status.success() && !out.stdout.is_empty() => {
            let text = String::from_utf8_lossy(&out.stdout);
            let address = text
                .split_whitespace()
                .skip_while(|w| *w != "inet")
                .nth(1)
                .unwrap_or("no address")
                .to_string();
            checks.push(check(
                "bridge",
                Level::Ok,
                format!("{bridge} is up with {address} (subnet {subnet})"),
            ));
            true
        }
        _ => {
            checks.push(check(
                "bridge",
                Level::Ok,
                format!(
                    "{bridge} is not there yet: the service makes it, with {subnet}, when the first machine starts"
                ),
            ));
            false
        }
    };
    let forwarding = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
        .map(|s| s.trim() == "1")
        .unwrap_or(false);
    checks.push(match (forwarding, bridge_up) {
        (true, _) => check("forwarding", Level::Ok, "IPv4 forwarding is on"),
        (false, false) => check(
            "forwarding",
            Level::Ok,
            "IPv4 forwarding is off: the service turns it on with the first machine and restores it after the last",
        ),
        (false, true) => check(
            "forwarding",
            Level::Warn,
            "IPv4 forwarding is off while the bridge is up: machines cannot reach beyond the host",
        )
        .fix("something else turned it off; `sudo sysctl -w net.ipv4.ip_forward=1`, or restart the machines"),
    });
    if nix::unistd::geteuid().is_root() {
        let tables = find_program("nft").and_then(|nft| {
            Command::new(nft)
                .args(["list", "tables"])
                .output()
                .ok()
                .filter(|o| o.status.success())
        });
        let has_nat = tables.is_some_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.split_whitespace().last() == Some("container"))
        });
        checks.push(match (has_nat, bridge_up) {
            (true, _) => check("nat", Level::Ok, "the `container` nftables table is in place (masquerade, owner isolation)"),
            (false, false) => check("nat", Level::Ok, "no `container` nftables table yet: made with the first machine"),
            (false, true) => check("nat", Level::Warn, "the bridge is up but the `container` nftables table is missing: machines reach nothing beyond the host and owners are not isolated")
                .fix("`nft flush ruleset` or a firewall reload removed it; restart the service (`container system stop` then `start`)"),
        });
    }
    checks
}

fn disk(view: &ServiceView) -> Check {
    let root = view
        .status
        .as_ref()
        .map(|s| PathBuf::from(&s.root))
        .unwrap_or_else(paths::root);
    // The data directory may not exist yet: its filesystem is its nearest existing ancestor's.
    let Some(existing) = root.ancestors().find(|p| p.exists()) else {
        return check(
            "disk",
            Level::Warn,
            format!("cannot find {}", root.display()),
        );
    };
    match nix::sys::statvfs::statvfs(existing) {
        Ok(st) => {
            let free = st.blocks_available() * st.fragment_size();
            disk_verdict(&root, free)
        }
        Err(e) => check(
            "disk",
            Level::Warn,
            format!("cannot read the free space of {}: {e}", existing.display()),
        ),
    }
}

const GIB: u64 = 1 << 30;

/// Free space under the data directory: images and machine disks live there.
pub fn disk_verdict(root: &Path, free: u64) -> Check {
    let detail = format!(
        "{:.1} GiB free under {}",
        free as f64 / GIB as f64,
        root.display()
    );
    if free < 2 * GIB {
        check("disk", Level::Fail, detail).fix(
            "free space there (`container image rm`, `container machine rm` of unused ones), or move the data directory with --root",
        )
    } else if free < 10 * GIB {
        check("disk", Level::Warn, detail)
            .fix("images and machine disks grow; free space before pulling large images")
    } else {
        check("disk", Level::Ok, detail)
    }
}

fn limits(view: &ServiceView) -> Check {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kib| format!("{:.1} GiB", kib as f64 / (1 << 20) as f64))
        .unwrap_or_else(|| "unknown memory".into());
    let per_user: Vec<String> = view
        .properties
        .iter()
        .filter(|p| p.key.starts_with("limits."))
        .map(|p| {
            let v = match &p.value {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            format!("{}={v}", p.key.trim_start_matches("limits."))
        })
        .collect();
    let users = if per_user.is_empty() {
        "per-user limits: ask the service (`container system property list`)".to_string()
    } else {
        format!("per-user limits: {}", per_user.join(", "))
    };
    check(
        "limits",
        Level::Ok,
        format!("host: {cpus} CPUs, {memory}; {users}"),
    )
}

fn render(report: &Report) -> String {
    let mut out = String::new();
    for c in &report.checks {
        let status = match c.status {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        };
        out.push_str(&format!("{status:<5} {:<19} {}\n", c.name, c.detail));
        if let Some(fix) = &c.fix {
            out.push_str(&format!("{:<25} -> {fix}\n", ""));
        }
    }
    out.push_str(if report.machines_can_run {
        "machines can run on this host\n"
    } else {
        "machines cannot run on this host until the FAIL lines are fixed\n"
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> KvmFacts {
        KvmFacts {
            pvm: false,
            device: true,
            open_error: None,
            caller_is_root: true,
        }
    }

    #[test]
    fn kvm_says_why_machines_fall_back_to_tcg_and_what_to_do() {
        assert_eq!(kvm_verdict(&facts()).status, Level::Ok);
        let pvm = kvm_verdict(&KvmFacts {
            pvm: true,
            ..facts()
        });
        assert_eq!(pvm.status, Level::Warn);
        assert!(pvm.detail.contains("nested PVM") && pvm.detail.contains("TCG"));
        let missing = kvm_verdict(&KvmFacts {
            device: false,
            ..facts()
        });
        assert!(missing.detail.contains("missing") && missing.fix.is_some());
        let denied = kvm_verdict(&KvmFacts {
            open_error: Some("Permission denied".into()),
            ..facts()
        });
        assert_eq!(denied.status, Level::Warn);
        // A user who cannot open it is fine: the service, as root, does.
        let user = kvm_verdict(&KvmFacts {
            open_error: Some("Permission denied".into()),
            caller_is_root: false,
            ..facts()
        });
        assert_eq!(user.status, Level::Ok);
    }

    #[test]
    fn a_full_disk_stops_machines_and_a_low_one_warns() {
        let root = Path::new("/var/lib/container");
        assert_eq!(disk_verdict(root, GIB).status, Level::Fail);
        assert_eq!(disk_verdict(root, 5 * GIB).status, Level::Warn);
        assert_eq!(disk_verdict(root, 50 * GIB).status, Level::Ok);
        assert!(disk_verdict(root, GIB).fix.is_some());
    }

    #[test]
    fn the_report_fails_when_any_check_fails() {
        let report = Report {
            machines_can_run: false,
            checks: vec![
                check("kvm", Level::Warn, "tcg").fix("nothing"),
                check("virtiofsd", Level::Fail, "virtiofsd not found").fix("install it"),
            ],
        };
        let text = render(&report);
        assert!(text.contains("FAIL  virtiofsd"));
        assert!(text.contains("-> install it"));
        assert!(text.ends_with("until the FAIL lines are fixed\n"));
    }
}
