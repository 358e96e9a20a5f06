//! The VM runtime against real components: QEMU microvm under whatever acceleration the host
//! allows (TCG here), vhost-device-vsock, virtiofsd, the real kernel and the static guest
//! agent, booting a busybox ext4 disk built here. Covers boot, exec through the agent, a
//! read-only share, a clean stop, cleanup after the VMM is killed, adoption by a new runtime
//! (a service restart), a boot that fails, and the confinement of QEMU and
//! vhost-device-vsock (their own uid, no groups, no capabilities, no environment; what a
//! guest that took QEMU over could read).
//!
//! Needs root, `busybox-static`, `mkfs.ext4`, qemu and the two helpers in ~/.cargo/bin; the
//! kernel is fetched once into the shared test cache (`container_testkit::guest`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use container_agent_proto::{self as proto, ExecRequest};
use container_api::machine::MachineState;
use container_apiserver::runtime::{
    self, HelperPaths, Runtime, RuntimeError, RuntimeOptions, ShareSpec, VmSpec,
};
use container_testkit::guest;

/// One VM at a time: two cores of software emulation are slow enough already.
static SERIAL: Mutex<()> = Mutex::new(());

/// Runs a test body alone, on a tokio runtime of its own.
fn alone<F: std::future::Future>(body: F) -> F::Output {
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    tokio::runtime::Runtime::new().unwrap().block_on(body)
}

/// Skips (or, in CI, fails) when the host cannot run these tests.
fn prerequisites() -> bool {
    let found = |name: &str| runtime::helpers::find_binary(name, None).is_ok();
    container_testkit::require_all(&[
        ("root", nix::unistd::geteuid().is_root()),
        ("busybox", Path::new("/bin/busybox").exists()),
        (
            "mkfs.ext4",
            Command::new("mkfs.ext4").arg("-V").output().is_ok(),
        ),
        ("vhost-device-vsock", found("vhost-device-vsock")),
        ("virtiofsd", found("virtiofsd")),
        ("qemu", found("qemu-system-x86_64")),
    ])
}

/// A busybox root filesystem as an ext4 image: busybox init with an inittab that says when
/// it is up, and nothing else.
fn busybox_base(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for d in [
        "bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "root", "mnt",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for applet in ["sh", "echo", "cat", "ls", "sleep", "mount", "poweroff"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::os::unix::fs::symlink("../bin/busybox", root.join("sbin/init")).unwrap();
    std::fs::write(
        root.join("etc/inittab"),
        "::sysinit:/bin/echo busybox init is up\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();
    let base = dir.join("base.ext4");
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&root)
        .arg(&base)
        .arg("64M")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    base
}

/// A service root, a runtime directory and a machine with a disk over a busybox image.
struct Fixture {
    dir: tempfile::TempDir,
    share: PathBuf,
}

/// A failed test leaves no VM behind: they run in process groups of their own.
impl Drop for Fixture {
    fn drop(&mut self) {
        if self.run_file().exists() {
            let (qemu, helpers, _) = self.recorded();
            qemu.kill();
            helpers.iter().for_each(|h| h.kill());
        }
    }
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        // The base disk lies in the image store, the only place a disk may be backed from.
        let images = dir.path().join("root/images");
        std::fs::create_dir_all(&images).unwrap();
        let base = images.join("base.ext4");
        std::fs::rename(busybox_base(dir.path()), &base).unwrap();
        for machine in ["dev", "other"] {
            let machine_dir = dir.path().join("machines").join(machine);
            std::fs::create_dir_all(&machine_dir).unwrap();
            runtime::disk::create_overlay(&base, &machine_dir.join("disk.qcow2"), 1 << 30).unwrap();
        }
        // Modes as the service keeps them: machine directories and the image store root's.
        use std::os::unix::fs::PermissionsExt;
        for private in ["machines/dev", "machines/other", "root/images"] {
            std::fs::set_permissions(
                dir.path().join(private),
                std::fs::Permissions::from_mode(0o700),
            )
            .unwrap();
        }
        let share = dir.path().join("shared");
        std::fs::create_dir_all(&share).unwrap();
        std::fs::write(share.join("greeting"), "hello from the host\n").unwrap();
        Fixture { dir, share }
    }

    fn runtime(&self) -> Runtime {
        Runtime::new(RuntimeOptions {
            helpers: HelperPaths {
                agent: Some(guest::agent().to_path_buf()),
                ..HelperPaths::default()
            },
            boot_timeout: Duration::from_secs(60),
            ..RuntimeOptions::new(self.dir.path().join("root"), self.dir.path().join("run"))
        })
    }

    fn machine_dir(&self) -> PathBuf {
        self.dir.path().join("machines/dev")
    }

    fn spec(&self) -> VmSpec {
        VmSpec {
            id: "dev".into(),
            machine_dir: self.machine_dir(),
            kernel: guest::kernel(),
            disk: self.machine_dir().join("disk.qcow2"),
            cpus: 1,
            memory_bytes: 256 << 20,
            shares: vec![ShareSpec {
                tag: "data".into(),
                host_path: self.share.clone(),
                guest_path: "/mnt/data".into(),
                read_only: true,
                owner_uid: 0,
                owner_gid: 0,
            }],
            boot: proto::BootConfig {
                version: proto::VERSION,
                machine_id: "dev".into(),
                instance_id: String::new(),
                hostname: "dev".into(),
                root_device: "/dev/vda".into(),
                grow_root: true,
                modules: Vec::new(),
                shares: Vec::new(),
                user: None,
                home_mount: proto::HomeMount::None,
                network: None,
                vsock_port: proto::PORT,
                ready_port: proto::READY_PORT,
                time_unix_ns: 0,
                init: vec!["/sbin/init".into()],
            },
            net: None,
        }
    }

    fn run_file(&self) -> PathBuf {
        self.machine_dir().join("run.json")
    }

    /// (pid, start ticks) of QEMU and the helpers, from run.json.
    fn recorded(
        &self,
    ) -> (
        runtime::process::ProcessId,
        Vec<runtime::process::ProcessId>,
        PathBuf,
    ) {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(self.run_file()).expect("run.json")).unwrap();
        let id = |v: &serde_json::Value| {
            runtime::process::ProcessId(v[0].as_i64().unwrap() as i32, v[1].as_u64().unwrap())
        };
        (
            id(&v["qemu"]),
            v["helpers"].as_array().unwrap().iter().map(id).collect(),
            PathBuf::from(v["run_dir"].as_str().unwrap()),
        )
    }
}

/// Runs a command through the agent; (exit code, stdout, stderr).
async fn exec(socket: &Path, argv: &[&str]) -> (Option<i32>, String, String) {
    let request = ExecRequest {
        argv: argv.iter().map(|a| a.to_string()).collect(),
        env: vec!["PATH=/bin:/sbin".into()],
        cwd: "/".into(),
        uid: Some(0),
        gid: Some(0),
        ..Default::default()
    };
    let out = proto::client::AgentClient::connect(socket, proto::PORT)
        .await
        .expect("connect to the agent")
        .exec(request)
        .await
        .expect("exec")
        .output(b"")
        .await
        .expect("the command's output");
    let code = match out.status {
        proto::client::ExitStatus::Code(c) => Some(c),
        proto::client::ExitStatus::Signal(_) => None,
    };
    (
        code,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Waits until `f` holds, at most `limit`.
async fn eventually(limit: Duration, what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn assert_cleaned_up(
    f: &Fixture,
    qemu: runtime::process::ProcessId,
    helpers: &[runtime::process::ProcessId],
    run_dir: &Path,
) {
    assert!(!qemu.alive(), "QEMU is gone");
    for h in helpers {
        assert!(!h.alive(), "helper {} is gone", h.pid());
    }
    assert!(!run_dir.exists(), "{} is removed", run_dir.display());
    assert!(!f.run_file().exists(), "run.json is removed");
}

#[test]
fn boots_runs_commands_shares_a_directory_and_stops_cleanly() {
    if !prerequisites() {
        return;
    }
    alone(async {
        let f = Fixture::new();
        let rt = f.runtime();
        let vm = rt.start(f.spec()).await.expect("boot");
        assert_eq!(rt.status("dev"), MachineState::Running);
        assert_eq!(rt.agent_socket("dev").unwrap(), vm.agent_socket);
        assert!(vm.agent_socket.as_os_str().len() < 108);

        let (code, out, _) =
            exec(&vm.agent_socket, &["sh", "-c", "echo hi; busybox uname -r"]).await;
        assert_eq!(code, Some(0));
        assert!(out.starts_with("hi\n6."), "{out}");
        let (code, out, _) = exec(&vm.agent_socket, &["cat", "/mnt/data/greeting"]).await;
        assert_eq!((code, out.as_str()), (Some(0), "hello from the host\n"));
        let (code, _, err) = exec(&vm.agent_socket, &["sh", "-c", "echo x > /mnt/data/new"]).await;
        assert_ne!(code, Some(0), "the share is read-only");
        assert!(err.contains("Read-only"), "{err}");
        assert!(!f.share.join("new").exists());

        // The boot log ends where the image's init starts; the console goes on with init.
        let boot =
            std::fs::read_to_string(runtime::console::log_path(&f.machine_dir(), true)).unwrap();
        let last = boot.lines().last().unwrap_or_default();
        assert!(last.starts_with(proto::INIT_MARKER), "{boot}");
        eventually(
            Duration::from_secs(10),
            "init prints to the console",
            || {
                std::fs::read_to_string(runtime::console::log_path(&f.machine_dir(), false))
                    .is_ok_and(|c| c.contains("busybox init is up"))
            },
        )
        .await;

        let (qemu, helpers, run_dir) = f.recorded();
        assert_eq!(qemu.pid(), vm.pid);
        assert_eq!(helpers.len(), 2, "vhost-device-vsock and one virtiofsd");
        let uid = assert_confined(qemu.pid());
        assert_eq!(assert_confined(helpers[0].pid()), uid, "vhost-device-vsock");
        assert_eq!(ps_uid(qemu.pid()), uid);
        assert_eq!(ps_uid(helpers[0].pid()), uid);
        // The environment the test runs in (cargo's variables) does not reach the VMM.
        assert!(std::env::var_os("CARGO_MANIFEST_DIR").is_some());
        let env = std::fs::read(format!("/proc/{}/environ", qemu.pid())).unwrap();
        let mut env: Vec<&[u8]> = env.split(|b| *b == 0).filter(|v| !v.is_empty()).collect();
        env.sort();
        assert_eq!(
            env,
            [
                &b"LANG=C"[..],
                b"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
            ]
        );
        // A guest that took QEMU over has its credentials: it reads no other machine's
        // disk, not the image store, not root's home, not even its own disk by name.
        for path in [
            f.dir.path().join("machines/other/disk.qcow2"),
            f.dir.path().join("machines/dev/disk.qcow2"),
            f.dir.path().join("root/images/base.ext4"),
            PathBuf::from("/root"),
            PathBuf::from("/etc/shadow"),
        ] {
            let (ok, err) = as_user(uid, &["head", "-c", "1"], &path);
            let namei = Command::new("namei").arg("-l").arg(&path).output().unwrap();
            assert!(
                !ok,
                "uid {uid} read {}: {err}\n{}",
                path.display(),
                String::from_utf8_lossy(&namei.stdout)
            );
            assert!(
                err.contains("Permission denied"),
                "{}: {err}",
                path.display()
            );
        }
        // Whoever reaches a socket controls the VM (QMP) or is root in it (vsock).
        let sockets = private_sockets(&run_dir);
        // vhost-device-vsock removes its vhost-user socket once QEMU is connected.
        assert!(sockets >= 3, "QMP, vsock, virtiofs: {sockets}");
        // Starting a running VM gives that VM back (a start that found it adopted mid-boot
        // returns once the boot ended), never a second one.
        let again = rt.start(f.spec()).await.expect("start of a running VM");
        assert_eq!(again.pid, vm.pid);

        // busybox init powers off on the agent's request, well before the timeout.
        let asked = Instant::now();
        rt.stop("dev", None, Duration::from_secs(30))
            .await
            .expect("stop");
        assert!(
            asked.elapsed() < Duration::from_secs(20),
            "{:?}",
            asked.elapsed()
        );
        assert_eq!(rt.status("dev"), MachineState::Stopped);
        assert_cleaned_up(&f, qemu, &helpers, &run_dir);
        assert!(rt.agent_socket("dev").is_err());
        rt.stop("dev", None, Duration::from_secs(1))
            .await
            .expect("stop is idempotent");

        // The disk keeps what the machine wrote... and boots again.
        let vm = rt.start(f.spec()).await.expect("second boot");
        let (code, _, _) = exec(&vm.agent_socket, &["sh", "-c", "echo kept > /root/file"]).await;
        assert_eq!(code, Some(0));
        rt.stop("dev", None, Duration::from_secs(30)).await.unwrap();
        let stopped = std::fs::read_to_string(f.machine_dir().join("console.log")).unwrap();
        let vm = rt.start(f.spec()).await.expect("third boot");
        let (_, out, err) = exec(&vm.agent_socket, &["cat", "/root/file"]).await;
        assert_eq!(
            out, "kept\n",
            "{err}\nconsole of the previous boot:\n{stopped}"
        );
        rt.stop("dev", None, Duration::from_secs(30)).await.unwrap();
    });
}

#[test]
fn a_killed_vmm_takes_its_helpers_and_runtime_files_with_it() {
    if !prerequisites() {
        return;
    }
    alone(async {
        let f = Fixture::new();
        let rt = f.runtime();
        rt.start(f.spec()).await.expect("boot");
        let (qemu, helpers, run_dir) = f.recorded();
        assert!(helpers.iter().all(|h| h.alive()));
        assert!(run_dir.join("agent.sock").exists());

        qemu.kill();
        eventually(
            Duration::from_secs(10),
            "the machine is seen stopped",
            || rt.status("dev") == MachineState::Stopped,
        )
        .await;
        assert_cleaned_up(&f, qemu, &helpers, &run_dir);
        // The boot log survives for `logs --boot`.
        assert!(runtime::console::log_path(&f.machine_dir(), true).ends_with("boot.log"));
    });
}

#[test]
fn a_restarted_service_adopts_running_machines_and_cleans_up_dead_ones() {
    if !prerequisites() {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let f = Fixture::new();
    let machines = f.dir.path().join("machines");

    // Each service is a tokio runtime of its own: its tasks die with it.
    // The first service boots the machine and goes away.
    let first = tokio::runtime::Runtime::new().unwrap();
    let vm = first
        .block_on(async { f.runtime().start(f.spec()).await })
        .expect("boot");
    first.shutdown_background();
    let (qemu, helpers, run_dir) = f.recorded();
    assert!(qemu.alive(), "the machine outlives the service");

    // The second adopts it: running, reachable, and stoppable.
    let second = tokio::runtime::Runtime::new().unwrap();
    second.block_on(async {
        let rt = f.runtime();
        assert_eq!(rt.status("dev"), MachineState::Stopped, "not adopted yet");
        assert_eq!(rt.adopt_all(&machines), 1);
        // Booting until its first health ping says the init finished: both run commands.
        assert!(matches!(
            rt.status("dev"),
            MachineState::Running | MachineState::Booting
        ));
        let (code, out, _) = exec(&rt.agent_socket("dev").unwrap(), &["echo", "adopted"]).await;
        assert_eq!((code, out.as_str()), (Some(0), "adopted\n"));
        assert_eq!(rt.running("dev").unwrap().pid, vm.pid);

        // Its watcher sees the VMM die although it is not the VMM's parent.
        qemu.kill();
        eventually(
            Duration::from_secs(10),
            "the adopted machine is seen stopped",
            || rt.status("dev") == MachineState::Stopped,
        )
        .await;
        assert_cleaned_up(&f, qemu, &helpers, &run_dir);
    });
    second.shutdown_background();

    // A machine that died while no service ran is cleaned up at adoption.
    let third = tokio::runtime::Runtime::new().unwrap();
    let (qemu, helpers, run_dir) = third.block_on(async {
        let rt = f.runtime();
        rt.start(f.spec()).await.expect("boot");
        f.recorded()
    });
    third.shutdown_background();
    qemu.kill();
    std::thread::sleep(Duration::from_millis(300));
    assert!(helpers.iter().any(|h| h.alive()), "nobody cleaned up yet");
    let fourth = tokio::runtime::Runtime::new().unwrap();
    fourth.block_on(async {
        let rt = f.runtime();
        assert_eq!(rt.adopt_all(&machines), 0);
        assert_eq!(rt.status("dev"), MachineState::Stopped);
        assert_cleaned_up(&f, qemu, &helpers, &run_dir);
    });
}

#[test]
fn a_boot_that_fails_says_why_with_the_console_tail() {
    if !prerequisites() {
        return;
    }
    alone(async {
        let f = Fixture::new();
        let rt = f.runtime();
        let mut spec = f.spec();
        spec.boot.init = vec!["/sbin/no-such-init".into()];
        spec.boot.root_device = "/dev/vdz".into();
        let err = rt
            .start(spec)
            .await
            .expect_err("the guest cannot mount its disk");
        let text = err.to_string();
        assert!(
            matches!(err, RuntimeError::ExitedDuringBoot { .. }),
            "{text}"
        );
        assert!(
            text.contains("/dev/vdz"),
            "the console tail names the cause: {text}"
        );
        assert_eq!(rt.status("dev"), MachineState::Stopped);
        assert!(!f.run_file().exists());
    });
}

/// Asserts that the process runs as a uid of its own: not root, every uid and gid the same,
/// no supplementary group, no capability, no way to gain one; returns the uid.
fn assert_confined(pid: i32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("{name} in {status}"))
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let uids = field("Uid:");
    let uid: u32 = uids[0].parse().unwrap();
    assert_ne!(uid, 0, "runs as root:\n{status}");
    assert!(uids.iter().all(|u| *u == uids[0]), "{uids:?}");
    assert!(field("Gid:").iter().all(|g| *g == uids[0]), "{status}");
    assert!(field("Groups:").is_empty(), "{status}");
    for caps in ["CapInh:", "CapPrm:", "CapEff:", "CapAmb:"] {
        assert_eq!(field(caps), ["0000000000000000"], "{caps} {status}");
    }
    assert_eq!(field("NoNewPrivs:"), ["1"]);
    uid
}

/// The uid `ps` shows for a process.
fn ps_uid(pid: i32) -> u32 {
    let out = Command::new("ps")
        .args(["-o", "uid=", "-p", &pid.to_string()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// Runs `argv path` with the credentials of `uid` (as QEMU has them); (success, stderr).
fn as_user(uid: u32, argv: &[&str], path: &Path) -> (bool, String) {
    let out = Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .args(["--clear-groups", "--no-new-privs", "--inh-caps=-all"])
        .args(argv)
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Counts the sockets under `dir`, asserting that each is for its owner alone.
fn private_sockets(dir: &Path) -> usize {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        if meta.is_dir() {
            n += private_sockets(&entry.path());
        } else if meta.file_type().is_socket() {
            let mode = meta.permissions().mode() & 0o777;
            assert_eq!(
                mode & 0o077,
                0,
                "{} is mode {mode:o}",
                entry.path().display()
            );
            n += 1;
        }
    }
    n
}
