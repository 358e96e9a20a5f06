//! A minimal harness that boots the real static agent in a real VM, put together from the
//! service's own parts wherever they fit: the guest kernel and the static agent from
//! `container-testkit`, the initramfs (the agent as /init, the modules it needs) built by
//! `runtime::initramfs`, the machine disk a qcow2 overlay of a busybox ext4 base made by
//! `runtime::disk`, and QEMU's command line from `runtime::qemu` (microvm under TCG), plus a
//! user-mode network the guest cannot reach anything through. vhost-device-vsock serves the
//! agent's vsock and virtiofsd one share. The runtime's own runner is tested in the service's
//! crate; this one only serves the agent's tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use container_agent_proto::{BootConfig, HomeMount, NetConfig, Share, UserSpec};
use container_apiserver::config::Virtualization;
use container_apiserver::runtime::vmm::{DiskLayer, Launch};
use container_apiserver::runtime::{Vmm, disk, helpers, initramfs, qemu};
use container_testkit::guest;

/// Whether this host can boot the VM; in CI a missing piece is a failure, not a skip.
pub fn prerequisites() -> bool {
    let found = |name: &str| helpers::find_binary(name, None).is_ok();
    container_testkit::require_all(&[
        ("root", nix::unistd::geteuid().is_root()),
        ("busybox", Path::new("/bin/busybox").exists()),
        ("mkfs.ext4", container_testkit::on_path("mkfs.ext4")),
        ("qemu-img", container_testkit::on_path("qemu-img")),
        (helpers::QEMU, found(helpers::QEMU)),
        (
            helpers::VHOST_DEVICE_VSOCK,
            found(helpers::VHOST_DEVICE_VSOCK),
        ),
        (helpers::VIRTIOFSD, found(helpers::VIRTIOFSD)),
    ])
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
        let kernel = guest::kernel();

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
        let base = d.join("base.ext4");
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&rootfs)
            .arg(&base)
            .arg("64M"));
        // A bigger device than filesystem, as a machine's disk over its image: the agent
        // grows it.
        let disk = d.join("disk.qcow2");
        disk::create_overlay(&base, &disk, DISK_BYTES).unwrap();

        let share = d.join("share");
        std::fs::create_dir_all(&share).unwrap();
        std::fs::write(share.join("greeting"), "hello from the host\n").unwrap();

        // The initramfs the service builds: the agent, the modules it needs.
        let built = initramfs::build(&d.join("initramfs"), &kernel, guest::agent()).unwrap();
        let cfg = BootConfig {
            version: container_agent_proto::VERSION,
            machine_id: "m-test".into(),
            instance_id: String::new(),
            hostname: "agent-test".into(),
            root_device: "/dev/vda".into(),
            grow_root: true,
            modules: built.modules.clone(),
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
        let initrd = d.join("initrd.cpio");
        initramfs::with_boot_config(&built.path, &serde_json::to_vec(&cfg).unwrap(), &initrd)
            .unwrap();

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

/// The host's TSC frequency, which the guest kernel is given under TCG (see
/// `runtime::qemu`): the clock `/proc/cpuinfo` reports.
fn host_tsc_khz() -> Option<u64> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("cpu MHz"))
        .and_then(|l| {
            l.trim_start_matches([' ', '\t', ':'])
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map(|mhz| (mhz * 1000.0) as u64)
}

/// Starts the vhost-user helpers and QEMU.
fn launch(
    d: &Path,
    vmlinuz: &Path,
    initrd: &Path,
    disk: &Path,
    share: &Path,
) -> (Child, Vec<Child>) {
    for sock in ["vhu.sock", "vsock.sock", "vfs.sock", "qmp.sock"] {
        let _ = std::fs::remove_file(d.join(sock));
    }
    let vhu = d.join("vhu.sock");
    let vsock = d.join("vsock.sock");
    let vfs = d.join("vfs.sock");
    let log = |name: &str| std::fs::File::create(d.join(name)).unwrap();
    // The runtime's own helper command lines, with their output in files of this test's.
    let spawn = |mut c: Command, name: &str| {
        c.stdout(log(&format!("{name}.log")))
            .stderr(log(&format!("{name}.err")))
            .spawn()
            .unwrap()
    };
    let vsock_helper = helpers::vhost_device_vsock(
        &helpers::find_binary(helpers::VHOST_DEVICE_VSOCK, None).unwrap(),
        &vhu,
        &vsock,
    );
    let share_spec = container_apiserver::runtime::ShareSpec {
        tag: "shared".into(),
        host_path: share.to_path_buf(),
        guest_path: "/shared".into(),
        read_only: false,
        owner_uid: nix::unistd::geteuid().as_raw(),
        owner_gid: nix::unistd::getegid().as_raw(),
    };
    let listener = std::os::unix::net::UnixListener::bind(&vfs).unwrap();
    let fs_helper = helpers::virtiofsd(
        &helpers::find_binary(helpers::VIRTIOFSD, None).unwrap(),
        &share_spec,
        listener.into(),
        &[],
    );
    let helpers = vec![spawn(vsock_helper, "vsock"), spawn(fs_helper, "virtiofsd")];
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
    let vmm = qemu::Qemu {
        binary: helpers::find_binary(helpers::QEMU, None).unwrap(),
        accel: qemu::choose_accel(Virtualization::Tcg, qemu::HostKvm::probe()),
        tsc_khz: host_tsc_khz(),
        tb_mib: None,
    };
    // QEMU gets what it uses as descriptors, as the runtime hands them over.
    let open = |p: &Path, write: bool| -> std::os::fd::OwnedFd {
        std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(p)
            .unwrap()
            .into()
    };
    let disk_layers = disk::chain(disk, &[std::fs::canonicalize(d).unwrap()])
        .unwrap()
        .into_iter()
        .enumerate()
        .map(|(i, f)| DiskLayer {
            format: f.format,
            files: vec![open(&f.path, i == 0)],
            read_only: i > 0,
        })
        .collect();
    let console_file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&console)
        .unwrap();
    let control = std::os::unix::net::UnixListener::bind(d.join("qmp.sock")).unwrap();
    let share_connection = std::os::unix::net::UnixStream::connect(&vfs).unwrap();
    let qemu = vmm
        .command(Launch {
            cpus: 1,
            memory_mib: 256,
            kernel: std::fs::File::open(vmlinuz).unwrap().into(),
            initrd: initrd.to_path_buf(),
            disk: disk_layers,
            console: console_file.into(),
            control: control.into(),
            vsock: vhu.clone(),
            shares: vec![("shared".to_string(), share_connection.into())],
            net: None,
        })
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
