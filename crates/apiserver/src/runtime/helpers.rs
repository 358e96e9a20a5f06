//! The programs a VM needs besides the service: QEMU, the guest agent, and the vhost-user
//! helpers `vhost-device-vsock` and `virtiofsd`, found at a configured path, next to the
//! service binary, on PATH, or in `~/.cargo/bin` (where `cargo install` puts the helpers).
//! The helpers' command lines are built here (QEMU's in `qemu`); supervision spawns them.
//! Helpers run in their own process group so they outlive a service restart, with their
//! output in the machine's `helpers.log`, and with a clean environment ([`clean_env`]): none
//! of the service's variables (`TMPDIR`, `QEMU_*`, proxies, `$HOME`) reaches them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{RuntimeError, ShareSpec};

/// Configured paths of the programs; `None` searches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HelperPaths {
    pub qemu: Option<PathBuf>,
    pub virtiofsd: Option<PathBuf>,
    pub vhost_device_vsock: Option<PathBuf>,
    pub agent: Option<PathBuf>,
}

/// The program names.
pub const QEMU: &str = "qemu-system-x86_64";
pub const VIRTIOFSD: &str = "virtiofsd";
pub const VHOST_DEVICE_VSOCK: &str = "vhost-device-vsock";
pub const AGENT: &str = "container-agent";

/// How to get a program that is missing.
fn install_hint(name: &str) -> &'static str {
    match name {
        VIRTIOFSD | VHOST_DEVICE_VSOCK => {
            "install it with `cargo install virtiofsd vhost-device-vsock` (needs libseccomp-dev and libcap-ng-dev; scripts/install-deps.sh does it)"
        }
        QEMU => "install the qemu-system-x86 package",
        AGENT => {
            "build it with scripts/build.sh (a static binary), or set `agent` under [runtime] in config.toml"
        }
        _ => "install it, or set its path under [runtime] in config.toml",
    }
}

/// The error for a program that cannot be found or started.
pub fn missing(name: &str) -> RuntimeError {
    RuntimeError::MissingBinary {
        name: name.to_string(),
        hint: install_hint(name),
    }
}

/// The whole environment of every program the runtime starts: a fixed search path and the C
/// locale. Whatever the service was started with (`TMPDIR`, `QEMU_AUDIO_DRV`, `LD_PRELOAD`
/// under a careless sudo) stays with the service.
pub const HELPER_ENV: [(&str, &str); 2] = [
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("LANG", "C"),
];

/// Gives `cmd` [`HELPER_ENV`] and nothing else of the service's environment.
pub fn clean_env(cmd: &mut Command) -> &mut Command {
    cmd.env_clear().envs(HELPER_ENV)
}

/// Finds a program: the configured path, else next to the service, on PATH, in
/// `~/.cargo/bin` (of the service's user, from the password database, and of root). Among
/// several, one that every user may execute wins: virtiofsd runs as the machine's owner, and
/// QEMU and vhost-device-vsock as the VM's own user, who may not reach root's home.
pub fn find_binary(name: &str, configured: Option<&Path>) -> Result<PathBuf, RuntimeError> {
    if let Some(c) = configured {
        return if c.is_file() {
            Ok(c.to_path_buf())
        } else {
            Err(RuntimeError::MissingBinary {
                name: format!("{name} (configured as {})", c.display()),
                hint: install_hint(name),
            })
        };
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
    for home in [crate::config::service_home(), Some(PathBuf::from("/root"))]
        .into_iter()
        .flatten()
    {
        candidates.push(home.join(".cargo/bin").join(name));
    }
    let existing: Vec<PathBuf> = candidates.into_iter().filter(|p| p.is_file()).collect();
    existing
        .iter()
        .find(|p| world_executable(p))
        .or(existing.first())
        .cloned()
        .ok_or_else(|| missing(name))
}

/// Whether others may execute `path` and traverse every directory above it.
fn world_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.ancestors().all(|p| {
        p.as_os_str().is_empty()
            || std::fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o001 != 0)
    })
}

/// vhost-device-vsock serving a VM's vsock device on `vhost_user` (for the VMM), the guest
/// as CID 3, and host sessions through the hybrid-vsock socket `uds`.
pub fn vhost_device_vsock(program: &Path, vhost_user: &Path, uds: &Path) -> Command {
    let mut c = Command::new(program);
    c.arg("--guest-cid")
        .arg("3")
        .arg("--socket")
        .arg(vhost_user)
        .arg("--uds-path")
        .arg(uds);
    c
}

/// The descriptor number virtiofsd receives its listening socket on.
const VIRTIOFSD_FD: i32 = 3;

/// virtiofsd serving `share` on the vhost-user socket `listener` (bound by the service). It
/// runs as the share's owner, so the guest reaches only what the owner can; unprivileged, it
/// needs `--sandbox none`. It gets the socket as a descriptor, never a path: the directory
/// holding the socket stays root's, so the owner cannot swap it for a link to another
/// socket that root's QEMU would then connect to. `extra` (`[runtime] virtiofsd-args`)
/// comes last.
///
/// `--cache auto`, chosen by measurement (bench/home-share.sh, numbers in bench/README.md)
/// and by what the user sees (crates/e2e/tests/home_share.rs). The guest keeps a name and a
/// file's attributes (size, mode, existence) for 1 s after the host changed them, but never
/// a file's contents: it drops a file's cached pages at each open, so an edit of the host's
/// is read at the next open. Shared writable mmap works (pages go through the guest's page
/// cache), which SQLite's WAL mode needs for its `-shm` index.
/// - `never` has no 1 s window, but opens files for direct I/O, and a 6.1 guest kernel
///   refuses MAP_SHARED on those (ENODEV: SQLite in WAL mode fails with "disk I/O error");
///   `--allow-mmap` needs a 6.6 guest kernel (FUSE_DIRECT_IO_ALLOW_MMAP). Every stat is a
///   LOOKUP and a GETATTR on the host: a warm walk of 12,000 files took 16x `auto`'s
///   (streaming 1 GiB was about 5x faster: direct I/O skips the guest's page cache, whose
///   copies are dear under emulation).
/// - `metadata` and `always` keep names and attributes for a day (`always` the contents
///   too): a file the host deleted or an editor replaced stays as it was in the guest
///   (`always` fails the e2e test at the editor's save).
/// - `--writeback` lets the guest trust its own idea of a file's size, so what the host
///   appends to a file the guest has cached would not be seen: not used.
/// - `--thread-pool-size=16` measured the same as none (0: the queue's thread serves each
///   request itself) for the walk and `git status`: the guest asks one thing at a time and
///   both cores are busy emulating it. `--xattr` and `--posix-acl` stay off (virtiofsd's
///   default; not measured yet): user xattrs and ACLs are not served.
/// - The guest mounts with no options: virtiofs has no DAX in QEMU 7.2's
///   vhost-user-fs-device, and caching is the server's choice.
pub fn virtiofsd(
    program: &Path,
    share: &ShareSpec,
    listener: std::os::fd::OwnedFd,
    extra: &[String],
) -> Command {
    let mut c = Command::new(program);
    super::sys::pass_fd(&mut c, listener, VIRTIOFSD_FD);
    c.arg("--fd")
        .arg(VIRTIOFSD_FD.to_string())
        .arg("--shared-dir")
        .arg(&share.host_path)
        .args(["--sandbox", "none", "--cache", "auto"]);
    if share.read_only {
        c.arg("--readonly");
    }
    // Last, so the config's `--cache` (or any repeated option) wins: virtiofsd takes the
    // last occurrence.
    c.args(extra);
    if share.owner_uid != nix::unistd::geteuid().as_raw() {
        use std::os::unix::process::CommandExt;
        c.uid(share.owner_uid).gid(share.owner_gid);
    }
    c
}

/// The open-file limit the service gives its helpers, as its systemd unit does
/// (`LimitNOFILE`).
pub const OPEN_FILES: u64 = 1 << 20;

/// Raises the service's hard limit on open files to [`OPEN_FILES`] (or the kernel's
/// `nr_open`, if lower), leaving its own soft limit: every helper inherits it. virtiofsd
/// holds a descriptor for each host file the guest has looked up (it may not use file
/// handles as an unprivileged user) and raises its soft limit to the hard one; under a
/// hard limit of 20,000, which a service started from a shell may have, a `git status` in a
/// repository of 20,000 files made it fail with EMFILE. Returns the new hard limit.
pub fn raise_open_files_limit() -> nix::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(OPEN_FILES);
    let wanted = OPEN_FILES.min(nr_open);
    if hard >= wanted {
        return Ok(hard);
    }
    setrlimit(Resource::RLIMIT_NOFILE, soft, wanted)?;
    Ok(wanted)
}

/// Starts `cmd` in a process group of its own, output appended to `log`.
pub fn spawn(mut cmd: Command, name: &'static str, log: &Path) -> Result<Child, RuntimeError> {
    use std::os::unix::process::CommandExt;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(RuntimeError::io("opening", log))?;
    let err = out.try_clone().map_err(RuntimeError::io("opening", log))?;
    super::sys::private_umask(&mut cmd);
    clean_env(&mut cmd)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    cmd.spawn().map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            missing(name)
        } else {
            RuntimeError::Spawn {
                program: name.to_string(),
                source,
            }
        }
    })
}

/// Waits until a helper has created its socket; fails if it exits first or takes too long.
pub fn wait_for_socket(
    socket: &Path,
    child: &mut Child,
    helper: &'static str,
    log: &Path,
) -> Result<(), RuntimeError> {
    const LIMIT: Duration = Duration::from_secs(10);
    let deadline = Instant::now() + LIMIT;
    while !socket.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(RuntimeError::HelperExited {
                helper,
                status: status.to_string(),
                log: log.to_path_buf(),
            });
        }
        if Instant::now() > deadline {
            return Err(RuntimeError::HelperTimeout {
                helper,
                socket: socket.to_path_buf(),
                secs: LIMIT.as_secs(),
                log: log.to_path_buf(),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_program_is_named_with_how_to_install_it() {
        let err = find_binary(VIRTIOFSD, Some(Path::new("/nonexistent/virtiofsd"))).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("/nonexistent/virtiofsd"), "{text}");
        assert!(
            text.contains("cargo install virtiofsd vhost-device-vsock"),
            "{text}"
        );
        let err = find_binary("no-such-program-here", None).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("no-such-program-here not found")
        );
        assert!(find_binary("sh", None).is_ok());
    }

    fn args(c: &Command) -> Vec<String> {
        c.get_args().map(|a| a.to_string_lossy().into()).collect()
    }

    #[test]
    fn helper_command_lines_wire_their_sockets_and_the_share() {
        let vsock = vhost_device_vsock(
            Path::new("/bin/vdv"),
            Path::new("/run/vm/a/vhu.sock"),
            Path::new("/run/vm/a/vsock.sock"),
        );
        assert_eq!(
            args(&vsock),
            [
                "--guest-cid",
                "3",
                "--socket",
                "/run/vm/a/vhu.sock",
                "--uds-path",
                "/run/vm/a/vsock.sock"
            ]
        );
        let share = ShareSpec {
            tag: "home".into(),
            host_path: "/home/alice".into(),
            guest_path: "/home/alice".into(),
            read_only: true,
            owner_uid: nix::unistd::geteuid().as_raw(),
            owner_gid: 0,
        };
        let dir = tempfile::tempdir().unwrap();
        let listener = std::os::unix::net::UnixListener::bind(dir.path().join("s")).unwrap();
        let extra = ["--cache".to_string(), "never".to_string()];
        let fs = virtiofsd(Path::new("/bin/vfs"), &share, listener.into(), &extra);
        assert_eq!(fs.get_program(), "/bin/vfs");
        assert_eq!(
            args(&fs),
            [
                "--fd",
                "3",
                "--shared-dir",
                "/home/alice",
                "--sandbox",
                "none",
                "--cache",
                "auto",
                "--readonly",
                "--cache",
                "never"
            ]
        );
    }

    #[test]
    fn helpers_may_open_a_million_files() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let hard = match raise_open_files_limit() {
            Ok(hard) => hard,
            // Root without CAP_SYS_RESOURCE (a sandbox, as on the build machines).
            Err(nix::errno::Errno::EPERM) => return,
            Err(e) => panic!("{e}"),
        };
        assert!(hard >= OPEN_FILES.min(1 << 20), "{hard}");
        // What a spawned helper inherits.
        let out = Command::new("sh")
            .args(["-c", "ulimit -Hn"])
            .output()
            .unwrap();
        let seen: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        assert_eq!(seen, hard);
    }

    #[test]
    fn a_passed_descriptor_is_open_in_the_child_at_its_number() {
        let dir = tempfile::tempdir().unwrap();
        let listener = std::os::unix::net::UnixListener::bind(dir.path().join("s")).unwrap();
        let mut c = Command::new("sh");
        // The child sees a socket at fd 3, and nothing else of the parent's at fd 4.
        c.args(["-c", "test -S /proc/self/fd/3 && ! test -e /proc/self/fd/4"]);
        super::super::sys::pass_fd(&mut c, listener.into(), 3);
        assert!(c.status().unwrap().success());
    }

    #[test]
    fn helpers_get_none_of_the_services_environment() {
        // Cargo runs this test with CARGO_* and HOME set; a hostile TMPDIR is added too.
        assert!(std::env::var_os("CARGO_MANIFEST_DIR").is_some());
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("helpers.log");
        let mut c = Command::new("/usr/bin/env");
        c.env("TMPDIR", "/tmp/evil").env("QEMU_AUDIO_DRV", "wav");
        let status = spawn(c, "env", &log).unwrap().wait().unwrap();
        assert!(status.success());
        let mut seen: Vec<String> = std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        seen.sort();
        assert_eq!(
            seen,
            [
                "LANG=C",
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
            ]
        );
    }

    #[test]
    fn a_helper_that_dies_at_start_is_reported_with_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("helpers.log");
        let mut c = Command::new("sh");
        c.args(["-c", "echo broken >&2; exit 3"]);
        let mut child = spawn(c, "vhost-device-vsock", &log).unwrap();
        let err = wait_for_socket(
            &dir.path().join("s.sock"),
            &mut child,
            "vhost-device-vsock",
            &log,
        )
        .unwrap_err();
        assert!(matches!(err, RuntimeError::HelperExited { .. }), "{err}");
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "broken\n");
    }
}
