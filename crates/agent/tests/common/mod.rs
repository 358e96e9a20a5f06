//! A minimal harness that boots the real static agent in a real VM: the distribution's cloud
//! kernel (fetched once with `apt-get download` into a cache), an initramfs assembled here
//! with `cpio` (the agent as /init, the modules it needs resolved from their `depends=`
//! lists, the boot config), a busybox ext4 disk, QEMU microvm under TCG, vhost-device-vsock
//! for the agent's vsock and virtiofsd for one share. The runtime's own runner is tested in
//! the service's crate; this one only serves the agent's tests.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use container_agent_proto::{BootConfig, HomeMount, NetConfig, Share, UserSpec};

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn cache() -> PathBuf {
    std::env::var_os("CONTAINER_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                .join(".cache/container-test-images")
        })
}

fn cargo_bin(name: &str) -> Option<PathBuf> {
    let home = PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()));
    [
        home.join(".cargo/bin").join(name),
        PathBuf::from("/root/.cargo/bin").join(name),
    ]
    .into_iter()
    .find(|p| p.exists())
    .or_else(|| {
        let out = Command::new("which").arg(name).output().ok()?;
        out.status
            .success()
            .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    })
}

/// Whether this host can boot the VM; in CI a missing piece is a failure, not a skip.
pub fn prerequisites() -> bool {
    let have = |p: &str| {
        Command::new("which")
            .arg(p)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let missing: Vec<&str> = [
        ("root", nix::unistd::geteuid().is_root()),
        ("busybox", Path::new("/bin/busybox").exists()),
        ("mkfs.ext4", have("mkfs.ext4")),
        ("cpio", have("cpio")),
        ("qemu-system-x86_64", have("qemu-system-x86_64")),
        (
            "vhost-device-vsock",
            cargo_bin("vhost-device-vsock").is_some(),
        ),
        ("virtiofsd", cargo_bin("virtiofsd").is_some()),
    ]
    .into_iter()
    .filter(|(_, ok)| !ok)
    .map(|(what, _)| what)
    .collect();
    if missing.is_empty() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "prerequisites missing in CI: {missing:?}"
    );
    eprintln!("skipping: missing {missing:?}");
    false
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The cloud kernel: (vmlinuz, modules directory).
pub struct Kernel {
    pub vmlinuz: PathBuf,
    pub modules: PathBuf,
}

pub fn kernel() -> &'static Kernel {
    static KERNEL: OnceLock<Kernel> = OnceLock::new();
    KERNEL.get_or_init(|| {
        let dir = cache().join("agent-kernel");
        std::fs::create_dir_all(&dir).unwrap();
        let lock = std::fs::File::create(dir.join(".lock")).unwrap();
        let _guard = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .expect("locking the kernel cache");
        let root = dir.join("root");
        if !root.join("boot").exists() {
            let deps = run(Command::new("apt-cache").args(["depends", "linux-image-cloud-amd64"]));
            let package = deps
                .lines()
                .find_map(|l| l.trim().strip_prefix("Depends: "))
                .filter(|p| p.starts_with("linux-image-"))
                .expect("the cloud kernel metapackage names its kernel")
                .to_string();
            run(Command::new("apt-get")
                .args(["download", &package])
                .current_dir(&dir));
            let deb = std::fs::read_dir(&dir)
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|e| e == "deb"))
                .expect("apt-get download leaves a .deb");
            let staging = dir.join("staging");
            let _ = std::fs::remove_dir_all(&staging);
            run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&staging));
            std::fs::rename(&staging, &root).unwrap();
            let _ = std::fs::remove_file(deb);
        }
        let vmlinuz = std::fs::read_dir(root.join("boot"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("vmlinuz-")
            })
            .expect("the kernel package has a vmlinuz");
        let version =
            vmlinuz.file_name().unwrap().to_string_lossy()["vmlinuz-".len()..].to_string();
        Kernel {
            vmlinuz,
            modules: root.join("lib/modules").join(version),
        }
    })
}

/// The static agent, built as scripts/build.sh builds it.
pub fn agent() -> &'static Path {
    static AGENT: OnceLock<PathBuf> = OnceLock::new();
    AGENT.get_or_init(|| {
        let status = Command::new(env!("CARGO"))
            .args([
                "build",
                "--release",
                "-q",
                "-p",
                "container-agent",
                "--target",
                "x86_64-unknown-linux-gnu",
            ])
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .current_dir(workspace())
            .status()
            .expect("running cargo");
        assert!(status.success(), "building the static agent failed");
        workspace().join("target/x86_64-unknown-linux-gnu/release/container-agent")
    })
}

/// Module files of the kernel by name, and each one's dependencies (from `.modinfo`).
fn module_index(dir: &Path) -> HashMap<String, PathBuf> {
    fn walk(dir: &Path, out: &mut HashMap<String, PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if let Some(stem) = p
                .file_name()
                .unwrap()
                .to_str()
                .and_then(|n| n.strip_suffix(".ko"))
            {
                out.insert(stem.replace('-', "_"), p);
            }
        }
    }
    let mut out = HashMap::new();
    walk(&dir.join("kernel"), &mut out);
    out
}

fn depends(module: &Path) -> Vec<String> {
    let bytes = std::fs::read(module).unwrap();
    let key = b"\0depends=";
    let Some(at) = bytes.windows(key.len()).position(|w| w == key) else {
        return vec![];
    };
    let rest = &bytes[at + key.len()..];
    let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.replace('-', "_"))
        .collect()
}

/// `wanted` and their dependencies, dependencies first; built-in ones are skipped.
fn resolve_modules(dir: &Path, wanted: &[&str]) -> Vec<PathBuf> {
    let index = module_index(dir);
    let mut order = Vec::new();
    fn visit(name: &str, index: &HashMap<String, PathBuf>, order: &mut Vec<PathBuf>) {
        let Some(path) = index.get(name) else { return };
        if order.contains(path) {
            return;
        }
        for d in depends(path) {
            visit(&d, index, order);
        }
        order.push(path.clone());
    }
    for w in wanted {
        visit(w, &index, &mut order);
    }
    order
}

/// A booted machine and its helpers; everything is killed on drop.
pub struct Vm {
    /// One VM at a time: two cores of emulation are slow enough already.
    _serial: std::sync::MutexGuard<'static, ()>,
    pub dir: tempfile::TempDir,
    pub vsock: PathBuf,
    /// Where the agent reports it is ready: connect to `vsock` only after it has.
    pub ready: container_agent_proto::client::ReadyListener,
    qemu: Child,
    helpers: Vec<Child>,
}

pub const DISK_BYTES: u64 = 512 << 20;

impl Vm {
    /// Boots a busybox machine with a user, a share, a disk to grow and a user-mode network.
    pub fn boot() -> Vm {
        Vm::boot_with(|_| {})
    }

    /// Boots with the boot config changed by `edit`.
    pub fn boot_with(edit: impl FnOnce(&mut BootConfig)) -> Vm {
        static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let kernel = kernel();

        // The machine disk: busybox, its init, an inittab that says when it is up.
        let rootfs = d.join("rootfs");
        for sub in [
            "bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "root", "run",
        ] {
            std::fs::create_dir_all(rootfs.join(sub)).unwrap();
        }
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
        let applets = run(Command::new("/bin/busybox").arg("--list"));
        for applet in applets.lines().filter(|a| *a != "busybox") {
            let _ = std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet));
        }
        std::os::unix::fs::symlink("../bin/busybox", rootfs.join("sbin/init")).unwrap();
        std::fs::write(
            rootfs.join("etc/inittab"),
            "::sysinit:/bin/echo busybox init is up\n::shutdown:/bin/sync\n",
        )
        .unwrap();
        std::fs::write(
            rootfs.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nubuntu:x:1000:1000::/home/ubuntu:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            rootfs.join("etc/group"),
            "root:x:0:\nwheel:x:10:\nubuntu:x:1000:\n",
        )
        .unwrap();
        std::fs::create_dir_all(rootfs.join("etc/skel")).unwrap();
        std::fs::write(rootfs.join("etc/skel/.profile"), "# from skel\n").unwrap();
        let disk = d.join("disk.ext4");
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&rootfs)
            .arg(&disk)
            .arg("64M"));
        // A bigger device than filesystem: the agent grows it.
        std::fs::File::options()
            .write(true)
            .open(&disk)
            .unwrap()
            .set_len(DISK_BYTES)
            .unwrap();

        let share = d.join("share");
        std::fs::create_dir_all(&share).unwrap();
        std::fs::write(share.join("greeting"), "hello from the host\n").unwrap();

        // The initramfs: the agent, the modules, the boot config.
        let initrd_root = d.join("initramfs");
        std::fs::create_dir_all(initrd_root.join("container")).unwrap();
        std::fs::create_dir_all(initrd_root.join("modules")).unwrap();
        std::fs::copy(agent(), initrd_root.join("init")).unwrap();
        let wanted = [
            "virtio_mmio",
            "virtio_blk",
            "vmw_vsock_virtio_transport",
            "virtio_net",
            "virtiofs",
        ];
        let mut modules = Vec::new();
        for m in resolve_modules(&kernel.modules, &wanted) {
            let name = m.file_name().unwrap();
            std::fs::copy(&m, initrd_root.join("modules").join(name)).unwrap();
            modules.push(format!("/modules/{}", name.to_string_lossy()));
        }
        let cfg = BootConfig {
            version: container_agent_proto::VERSION,
            machine_id: "m-test".into(),
            hostname: "agent-test".into(),
            root_device: "/dev/vda".into(),
            grow_root: true,
            modules,
            shares: vec![Share {
                tag: "shared".into(),
                guest_path: "/mnt/host share".into(),
                read_only: true,
            }],
            user: Some(UserSpec {
                name: "alice.b".into(),
                uid: 1000,
                gid: 1000,
                home: "/home/alice.b".into(),
                shell: "/bin/zsh".into(),
            }),
            home_mount: HomeMount::None,
            network: Some(NetConfig {
                interface: "eth0".into(),
                address_cidr: "10.0.2.15/24".into(),
                gateway: "10.0.2.2".into(),
                nameservers: vec!["10.0.2.3".into()],
            }),
            vsock_port: container_agent_proto::PORT,
            ready_port: container_agent_proto::READY_PORT,
            time_unix_ns: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64,
            init: vec!["/sbin/init".into()],
        };
        let mut cfg = cfg;
        edit(&mut cfg);
        std::fs::write(
            initrd_root.join("container/boot.json"),
            serde_json::to_vec(&cfg).unwrap(),
        )
        .unwrap();
        let initrd = d.join("initrd.cpio");
        let list = run(Command::new("find").arg(".").current_dir(&initrd_root));
        let mut cpio = Command::new("cpio")
            .args(["-o", "-H", "newc", "--quiet"])
            .current_dir(&initrd_root)
            .stdin(Stdio::piped())
            .stdout(std::fs::File::create(&initrd).unwrap())
            .spawn()
            .unwrap();
        use std::io::Write;
        cpio.stdin
            .take()
            .unwrap()
            .write_all(list.as_bytes())
            .unwrap();
        assert!(cpio.wait().unwrap().success());

        let console = d.join("console.log");
        let vsock = d.join("vsock.sock");
        let ready = container_agent_proto::client::ReadyListener::bind(
            &vsock,
            container_agent_proto::READY_PORT,
        )
        .unwrap();
        let mut attempt = 0;
        let (qemu, helpers) = loop {
            attempt += 1;
            let (mut qemu, mut helpers) = launch(d, &kernel.vmlinuz, &initrd, &disk, &share);
            // Under emulation a guest kernel now and then stalls before its first console
            // line; a fresh start gets past it (the runtime does the same).
            let deadline = Instant::now() + SILENCE_LIMIT;
            while Instant::now() < deadline && console.metadata().map(|m| m.len()).unwrap_or(0) == 0
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            if console.metadata().map(|m| m.len()).unwrap_or(0) > 0 || attempt == 3 {
                break (qemu, helpers);
            }
            eprintln!("the guest printed nothing in {SILENCE_LIMIT:?}; restarting it");
            let _ = qemu.kill();
            let _ = qemu.wait();
            for h in &mut helpers {
                let _ = h.kill();
                let _ = h.wait();
            }
        };
        Vm {
            _serial: serial,
            dir,
            vsock,
            ready,
            qemu,
            helpers,
        }
    }

    pub fn console(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("console.log")).unwrap_or_default()
    }

    /// Waits for QEMU to exit; its status.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.qemu.try_wait().unwrap() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// How long a booting guest may print nothing before it is restarted.
const SILENCE_LIMIT: Duration = Duration::from_secs(20);

/// The guest kernel's command line. Under emulation on a loaded host the kernel's TSC
/// calibration against the PIT fails now and then ("Marking TSC unstable") and the boot
/// hangs; under TCG the guest's TSC ticks at the host's rate, so it is given instead.
fn kernel_cmdline() -> String {
    let mut line = String::from("console=ttyS0 panic=-1 tsc=reliable no_timer_check");
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if let Some(mhz) = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("cpu MHz"))
        .and_then(|l| {
            l.trim_start_matches([' ', '\t', ':'])
                .trim()
                .parse::<f64>()
                .ok()
        })
    {
        line.push_str(&format!(" tsc_early_khz={}", (mhz * 1000.0) as u64));
    }
    line
}

/// Starts the vhost-user helpers and QEMU.
fn launch(
    d: &Path,
    vmlinuz: &Path,
    initrd: &Path,
    disk: &Path,
    share: &Path,
) -> (Child, Vec<Child>) {
    for sock in ["vhu.sock", "vsock.sock", "vfs.sock"] {
        let _ = std::fs::remove_file(d.join(sock));
    }
    let vhu = d.join("vhu.sock");
    let vsock = d.join("vsock.sock");
    let vfs = d.join("vfs.sock");
    let log = |name: &str| std::fs::File::create(d.join(name)).unwrap();
    let mut helpers = vec![
        Command::new(cargo_bin("vhost-device-vsock").unwrap())
            .arg("--guest-cid=3")
            .arg("--socket")
            .arg(&vhu)
            .arg("--uds-path")
            .arg(&vsock)
            .stdout(log("vsock.log"))
            .stderr(log("vsock.err"))
            .spawn()
            .unwrap(),
    ];
    helpers.push(
        Command::new(cargo_bin("virtiofsd").unwrap())
            .arg("--socket-path")
            .arg(&vfs)
            .arg("--shared-dir")
            .arg(share)
            .args(["--sandbox", "none", "--cache", "never"])
            .stdout(log("virtiofsd.log"))
            .stderr(log("virtiofsd.err"))
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(vhu.exists() && vfs.exists()) {
        assert!(
            Instant::now() < deadline,
            "the vhost-user helpers did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let console = d.join("console.log");
    let _ = std::fs::remove_file(&console);
    let qemu = Command::new("qemu-system-x86_64")
        .args([
            "-M",
            "microvm,rtc=on",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args([
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            "max",
            "-smp",
            "1",
            "-m",
            "256M",
        ])
        .args([
            "-object",
            "memory-backend-memfd,id=mem,size=256M,share=on",
            "-numa",
            "node,memdev=mem",
        ])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(kernel_cmdline())
        .arg("-drive")
        .arg(format!(
            "id=root,file={},format=raw,if=none",
            disk.display()
        ))
        .args(["-device", "virtio-blk-device,drive=root"])
        .arg("-chardev")
        .arg(format!("socket,id=vsk,path={}", vhu.display()))
        .args(["-device", "vhost-user-vsock-device,chardev=vsk"])
        .arg("-chardev")
        .arg(format!("socket,id=vfs,path={}", vfs.display()))
        .args(["-device", "vhost-user-fs-device,chardev=vfs,tag=shared"])
        // User-mode networking, restricted: the guest reaches nothing; the test only
        // checks the agent's configuration.
        .args([
            "-netdev",
            "user,id=n0,restrict=on",
            "-device",
            "virtio-net-device,netdev=n0",
        ])
        .stdin(Stdio::null())
        .stdout(log("qemu.log"))
        .stderr(log("qemu.err"))
        .spawn()
        .unwrap();
    (qemu, helpers)
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
        for h in &mut self.helpers {
            let _ = h.kill();
            let _ = h.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- console ---\n{}", self.console());
            for log in ["qemu.err", "vsock.err", "virtiofsd.err"] {
                let text = std::fs::read_to_string(self.dir.path().join(log)).unwrap_or_default();
                eprintln!("--- {log} ---\n{text}");
            }
        }
    }
}
