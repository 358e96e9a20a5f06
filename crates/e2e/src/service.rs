//! A real `container-apiserver` in a temporary root, driven through the real `container`
//! CLI; services in the test namespace take turns (see `Turn`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::{in_netns, install_bin, tail};

/// A service with its own root, run dir and socket; stopped (machines included) on drop.
/// Set in every service's environment under test; `trust_vmm` shows it never reaches QEMU.
pub const HOSTILE_ENV: (&str, &str) = ("QEMU_AUDIO_DRV", "wav");

#[derive(Debug)]
pub struct Service {
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
    pub run_dir: PathBuf,
    pub socket: PathBuf,
    pub config: PathBuf,
    /// The hosts file the service keeps machine names in (`--hosts-file`): never the host's
    /// /etc/hosts.
    pub hosts_file: PathBuf,
    /// The resolv.conf whose nameservers the service relays the machines' other DNS queries
    /// to (`--resolv-conf`): empty (no resolver) until a test writes one, never the host's.
    pub resolv_conf: PathBuf,
    process: std::sync::Mutex<Option<std::process::Child>>,
    /// This test's turn at [`netns`], held while the service lives; none for a service on
    /// the host's network (only one that boots no machine, such as the one installing the
    /// test kernel).
    turn: Option<Turn>,
}

/// One test at a time runs services in [`netns`], whatever `--test-threads` says: they share
/// its machine bridge and NAT table (two services there would race to make them and take
/// them down under each other), and VMs emulated side by side on a small host time out.
/// A test thread may hold several turns (a second service in the same test); others wait.
#[derive(Debug)]
struct Turn {
    owner: std::thread::ThreadId,
}

static TURN: std::sync::Mutex<Option<(std::thread::ThreadId, usize)>> = std::sync::Mutex::new(None);
static TURN_FREED: std::sync::Condvar = std::sync::Condvar::new();

impl Turn {
    fn take() -> Self {
        let me = std::thread::current().id();
        let mut held = TURN.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match *held {
                None => *held = Some((me, 1)),
                Some((owner, n)) if owner == me => *held = Some((me, n + 1)),
                Some(_) => {
                    held = TURN_FREED.wait(held).unwrap_or_else(|p| p.into_inner());
                    continue;
                }
            }
            return Self { owner: me };
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let mut held = TURN.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((owner, n)) = *held
            && owner == self.owner
        {
            *held = (n > 1).then_some((owner, n - 1));
        }
        TURN_FREED.notify_all();
    }
}

impl Service {
    /// Starts a service with the given config.toml text, in [`netns`].
    pub fn start(config: &str) -> Self {
        Self::start_with_root(config, None, true)
    }

    /// Starts a service in [`netns`] with the given config.toml text whose root is `root`
    /// (kept after the test), for tests that prepare the root (a small filesystem…).
    pub fn start_at(config: &str, root: &Path) -> Self {
        Self::start_with_root(config, Some(root), true)
    }

    /// Starts a config-less service on the host's network whose root is `root` (kept after
    /// the test). It must boot no machine.
    pub fn start_in(root: &Path) -> Self {
        Self::start_with_root("", Some(root), false)
    }

    fn start_with_root(config: &str, root: Option<&Path>, isolated: bool) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("ct-")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let root = root
            .map(Path::to_path_buf)
            .unwrap_or_else(|| dir.path().join("root"));
        let run_dir = dir.path().join("run");
        let socket = run_dir.join("api.sock");
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, config).expect("write config");
        let hosts_file = dir.path().join("hosts");
        std::fs::write(&hosts_file, "127.0.0.1\tlocalhost\n").expect("write hosts");
        let resolv_conf = dir.path().join("resolv.conf");
        std::fs::write(&resolv_conf, "").expect("write resolv.conf");
        // Let non-root test users reach the socket.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let turn = isolated.then(Turn::take);
        let service = Self {
            dir,
            root,
            run_dir,
            socket,
            config: config_path,
            hosts_file,
            resolv_conf,
            process: std::sync::Mutex::new(None),
            turn,
        };
        service.launch();
        service
    }

    /// Starts the service process (again, after `stop_service`).
    pub fn launch(&self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("apiserver.log"))
            .expect("log file");
        use std::os::unix::process::CommandExt;
        let server = install_bin("container-apiserver");
        let mut command = match self.turn.is_some() {
            true => in_netns(server),
            false => Command::new(server),
        };
        // `ip netns exec` execs the service: the child is the service itself.
        let child = command
            .arg("--root")
            .arg(&self.root)
            .arg("--run-dir")
            .arg(&self.run_dir)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--config")
            .arg(&self.config)
            .arg("--hosts-file")
            .arg(&self.hosts_file)
            .arg("--resolv-conf")
            .arg(&self.resolv_conf)
            .env("CONTAINER_LOG", "info,container_apiserver=debug")
            // A variable QEMU would act on: no helper may see the service's environment.
            .env(HOSTILE_ENV.0, HOSTILE_ENV.1)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("spawn container-apiserver");
        if let Some(mut old) = self.process.lock().unwrap().replace(child) {
            let _ = old.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.cli(&["system", "status"]).status.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the service did not start:\n{}", self.log());
    }

    /// The service's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("apiserver.log")).unwrap_or_default()
    }

    /// A `container` command aimed at this service.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(install_bin("container"));
        c.args(args)
            .env("CONTAINER_SOCKET", &self.socket)
            .env("CONTAINER_ROOT", &self.root)
            .env("CONTAINER_RUN_DIR", &self.run_dir)
            // No test forwards the SSH agent of whoever runs the suite; those that test
            // forwarding set their own.
            .env_remove("SSH_AUTH_SOCK")
            .stdin(Stdio::null());
        c
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run container")
    }

    /// Runs the CLI and returns stdout, failing the test (with the service log) otherwise.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "container {args:?} failed ({}):\nstdout: {}\nstderr: {}\nservice log tail:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            tail(&self.log(), 40)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs the CLI, expects failure, and returns stderr.
    pub fn cli_err(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            !out.status.success(),
            "container {args:?} unexpectedly succeeded:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Stops the service process (machines keep running).
    pub fn stop_service(&self) {
        let _ = self.cli(&["system", "stop"]);
        if let Some(mut child) = self.process.lock().unwrap().take() {
            let _ = child.wait();
        }
    }

    /// Kills the service process without letting it clean up (a crash).
    pub fn kill_service(&self) {
        if let Some(mut child) = self.process.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        // Stop every machine, then the service, so no VM outlives its test.
        if let Ok(out) = self.command(&["machine", "ls", "-q"]).output() {
            for name in String::from_utf8_lossy(&out.stdout).lines() {
                let _ = self.cli(&["machine", "stop", "--time", "5", name]);
            }
        }
        self.stop_service();
    }
}
