//! One QEMU `microvm` per running machine, with its helpers: `vhost-device-vsock` (the host
//! end of the agent's vsock) and one `virtiofsd` per shared directory, started as the
//! machine's owner so the guest reaches only what that user can. Runtime files live in a
//! short per-VM directory (Unix socket paths must stay under 108 bytes).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use container_api::ApiError;

use crate::config::Virtualization;

/// The accelerator and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Accel {
    pub kvm: bool,
    pub reason: String,
}

/// KVM when it can run a standard guest; TCG otherwise. Nested PVM (`kvm_pvm`) exposes
/// `/dev/kvm` but hangs standard kernels, so it counts as no KVM.
pub fn detect_accel(setting: Virtualization) -> Accel {
    match setting {
        Virtualization::Kvm => Accel {
            kvm: true,
            reason: "kvm (configured)".into(),
        },
        Virtualization::Tcg => Accel {
            kvm: false,
            reason: "tcg (configured)".into(),
        },
        Virtualization::Auto => {
            if Path::new("/sys/module/kvm_pvm").exists() {
                Accel {
                    kvm: false,
                    reason:
                        "tcg (KVM here is nested PVM, which cannot run a standard guest kernel)"
                            .into(),
                }
            } else if std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .is_ok()
            {
                Accel {
                    kvm: true,
                    reason: "kvm".into(),
                }
            } else {
                Accel {
                    kvm: false,
                    reason: "tcg (/dev/kvm is not available)".into(),
                }
            }
        }
    }
}

/// Finds a helper binary: configured path, next to the service, on PATH, in ~/.cargo/bin.
pub fn find_binary(name: &str, configured: Option<&str>) -> Result<PathBuf, ApiError> {
    if let Some(c) = configured {
        return Ok(PathBuf::from(c));
    }
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        candidates.push(dir.join(name));
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join(name)));
    }
    for home in [
        std::env::var_os("HOME").map(PathBuf::from),
        Some(PathBuf::from("/root")),
    ]
    .into_iter()
    .flatten()
    {
        candidates.push(home.join(".cargo/bin").join(name));
    }
    // Prefer a binary every user can execute: virtiofsd runs as the machine's owner.
    let existing: Vec<PathBuf> = candidates.into_iter().filter(|p| p.is_file()).collect();
    existing
        .iter()
        .find(|p| world_executable(p))
        .or(existing.first())
        .cloned()
        .ok_or_else(|| {
        let hint = match name {
            "virtiofsd" | "vhost-device-vsock" => "install it with `cargo install virtiofsd vhost-device-vsock` (scripts/install-deps.sh does)",
            "qemu-system-x86_64" => "install the qemu-system-x86 package",
            _ => "build it with scripts/build.sh",
        };
        ApiError::new(container_api::ErrorKind::Unavailable, format!("{name} not found: {hint}"))
    })
}

/// Whether others may execute `path` and traverse every directory above it.
fn world_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.ancestors().all(|p| {
        p.as_os_str().is_empty()
            || std::fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o001 != 0)
    })
}

/// Waits until `path` exists or the process dies.
pub fn wait_for_socket(path: &Path, child: &mut Child, what: &str) -> Result<(), ApiError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(ApiError::internal(format!(
                "{what} exited at start ({status})"
            )));
        }
        if Instant::now() > deadline {
            return Err(ApiError::internal(format!(
                "{what} did not create {}",
                path.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// What QEMU is started with.
#[derive(Debug)]
pub struct QemuArgs<'a> {
    pub accel: &'a Accel,
    pub cpus: u32,
    pub memory_mib: u64,
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub disk: &'a Path,
    pub console: &'a Path,
    pub qmp: &'a Path,
    pub vsock_socket: &'a Path,
    /// (tag, virtiofsd socket)
    pub shares: Vec<(String, PathBuf)>,
    pub tap: Option<(String, String)>,
}

/// The QEMU command line.
pub fn command(qemu: &Path, a: &QemuArgs<'_>) -> Command {
    let mut c = Command::new(qemu);
    c.args([
        "-M",
        "microvm,rtc=on",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ]);
    if a.accel.kvm {
        c.args(["-accel", "kvm", "-cpu", "host"]);
    } else {
        c.args(["-accel", "tcg,thread=multi", "-cpu", "max"]);
    }
    c.arg("-smp").arg(a.cpus.to_string());
    c.arg("-m").arg(format!("{}M", a.memory_mib));
    c.arg("-object").arg(format!(
        "memory-backend-memfd,id=mem,size={}M,share=on",
        a.memory_mib
    ));
    c.args(["-numa", "node,memdev=mem"]);
    c.arg("-serial")
        .arg(format!("file:{}", a.console.display()));
    c.arg("-kernel").arg(a.kernel);
    c.arg("-initrd").arg(a.initrd);
    // tsc=reliable and no_timer_check: under software emulation on a busy host, the
    // kernel's TSC and timer checks can stall a multi-vCPU guest before its first line.
    c.args([
        "-append",
        "console=ttyS0 panic=-1 quiet loglevel=4 rw tsc=reliable no_timer_check",
    ]);
    c.arg("-drive").arg(format!(
        "id=root,file={},format=qcow2,if=none,cache=writeback,discard=unmap",
        a.disk.display()
    ));
    c.args(["-device", "virtio-blk-device,drive=root"]);
    c.arg("-chardev")
        .arg(format!("socket,id=vsock,path={}", a.vsock_socket.display()));
    c.args(["-device", "vhost-user-vsock-device,chardev=vsock"]);
    for (i, (tag, sock)) in a.shares.iter().enumerate() {
        c.arg("-chardev")
            .arg(format!("socket,id=fs{i},path={}", sock.display()));
        c.arg("-device")
            .arg(format!("vhost-user-fs-device,chardev=fs{i},tag={tag}"));
    }
    c.args(["-device", "virtio-balloon-device,free-page-reporting=on"]);
    if let Some((tap, mac)) = &a.tap {
        c.arg("-netdev")
            .arg(format!("tap,id=n0,ifname={tap},script=no,downscript=no"));
        c.arg("-device")
            .arg(format!("virtio-net-device,netdev=n0,mac={mac}"));
    }
    c.arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", a.qmp.display()));
    c.stdin(Stdio::null());
    c
}

/// The start time of a process in clock ticks since boot (field 22 of /proc/PID/stat), to
/// tell a process from a later one that reused its pid.
pub fn start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// True when `pid` still runs and is the process that started at `ticks`.
pub fn alive(pid: i32, ticks: u64) -> bool {
    start_ticks(pid) == Some(ticks)
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(true)
}

/// Kills a process if it is still the one we started.
pub fn kill(pid: i32, ticks: u64) {
    if alive(pid, ticks) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// The last lines of a file (for errors that point at the boot log).
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
