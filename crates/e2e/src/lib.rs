//! The end-to-end harness: a real `container-apiserver` in a temporary root, the real
//! `container` CLI talking to it, a real `docker-registry` on 127.0.0.1, and the locally built
//! test images. Binaries come from `target/install/bin` (`scripts/build.sh` puts them there:
//! the guest agent must be the static build).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The repository root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("crates/e2e sits two levels below the root")
        .to_path_buf()
}

/// A binary of the install prefix `scripts/build.sh` lays out.
pub fn install_bin(name: &str) -> PathBuf {
    let path = workspace_root().join("target/install/bin").join(name);
    assert!(
        path.exists(),
        "{} is missing: run scripts/build.sh first",
        path.display()
    );
    path
}

/// Runs a command and returns its stdout, failing the test with its stderr otherwise.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Builds (or takes from the cache) a test image; returns its OCI layout directory.
pub fn test_image(name: &str) -> PathBuf {
    let out = run_ok(Command::new(workspace_root().join("tests/images/build.sh")).arg(name));
    PathBuf::from(
        out.lines()
            .last()
            .expect("build.sh prints the layout path")
            .trim(),
    )
}

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

/// A `docker-registry` on a free loopback port of [`netns`], stopped on drop.
#[derive(Debug)]
pub struct Registry {
    dir: tempfile::TempDir,
    pub addr: String,
}

impl Registry {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// `extra` is passed to `scripts/test-registry.sh start`: `--htpasswd FILE` for basic
    /// auth, `--token` for a bearer-token realm (with `--htpasswd`, one that wants a login).
    pub fn start_with(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let out = run_ok(
            in_netns(workspace_root().join("scripts/test-registry.sh"))
                .arg("start")
                .arg(dir.path())
                .args(extra),
        );
        let addr = out.lines().last().expect("an address").trim().to_string();
        Self { dir, addr }
    }

    /// Pushes an OCI layout as `name:tag`; returns the full reference.
    pub fn push(&self, layout: &Path, name_tag: &str) -> String {
        run_ok(
            in_netns(workspace_root().join("scripts/test-registry.sh"))
                .arg("push")
                .arg(self.dir.path())
                .arg(layout)
                .arg(name_tag),
        );
        format!("{}/{name_tag}", self.addr)
    }

    /// Pushes to a registry that requires basic auth (`user:password`).
    pub fn push_with_auth(&self, layout: &Path, name_tag: &str, creds: &str) -> String {
        run_ok(
            in_netns(workspace_root().join("scripts/test-registry.sh"))
                .arg("push")
                .arg(self.dir.path())
                .arg(layout)
                .arg(name_tag)
                .env("REGISTRY_CREDS", creds),
        );
        format!("{}/{name_tag}", self.addr)
    }

    /// Where the registry keeps its blobs (to corrupt them on purpose).
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// What the token server of `--token` logged: a line per token issued or refused.
    pub fn token_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("token.log")).unwrap_or_default()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = in_netns(workspace_root().join("scripts/test-registry.sh"))
            .arg("stop")
            .arg(self.dir.path())
            .output();
    }
}

/// A TCP relay on a free loopback port that passes what the far end sends at a bounded rate,
/// so that a download is reliably still under way when a test acts on it. Stops on drop.
#[derive(Debug)]
pub struct Throttle {
    pub addr: String,
    /// Bytes per second towards the client; 0 for no limit.
    rate: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Throttle {
    /// Relays to `upstream` (`host:port`), `bytes_per_second` towards the client.
    pub fn start(upstream: &str, bytes_per_second: u64) -> Self {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let rate = Arc::new(AtomicU64::new(bytes_per_second));
        let stop = Arc::new(AtomicBool::new(false));
        let (upstream, thread_rate, thread_stop) =
            (upstream.to_string(), rate.clone(), stop.clone());
        let (bound, addr) = std::sync::mpsc::channel();
        // The relay lives in the test namespace, beside the registry and the service: its
        // thread enters it before making any socket (threads it starts inherit it).
        std::thread::spawn(move || {
            enter_netns();
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the relay");
            bound
                .send(listener.local_addr().unwrap().to_string())
                .unwrap();
            for client in listener.incoming() {
                if thread_stop.load(Ordering::SeqCst) {
                    break;
                }
                let (Ok(client), Ok(server)) = (client, std::net::TcpStream::connect(&upstream))
                else {
                    continue;
                };
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || relay(c2, s2, None));
                let rate = thread_rate.clone();
                std::thread::spawn(move || relay(server, client, Some(rate)));
            }
        });
        let addr = addr.recv().expect("the relay is bound");
        Self { addr, rate, stop }
    }

    /// Changes the rate of every connection, open ones included; 0 for no limit.
    pub fn set_rate(&self, bytes_per_second: u64) {
        self.rate
            .store(bytes_per_second, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Copies `from` to `to` until either ends, pacing to `rate` bytes per second if given, then
/// closes both so the other direction ends too.
fn relay(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    rate: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
) {
    use std::io::{Read, Write};
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        let limit = rate
            .as_ref()
            .map_or(0, |r| r.load(std::sync::atomic::Ordering::SeqCst));
        if limit > 0 {
            std::thread::sleep(Duration::from_secs_f64(n as f64 / limit as f64));
        }
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wakes the accept loop so it sees the flag (from inside the namespace it is in).
        let addr = self.addr.clone();
        let _ = std::thread::spawn(move || {
            enter_netns();
            let _ = std::net::TcpStream::connect(&addr);
        })
        .join();
    }
}

/// A service with its own root, run dir and socket; stopped (machines included) on drop.
#[derive(Debug)]
pub struct Service {
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
    pub run_dir: PathBuf,
    pub socket: PathBuf,
    pub config: PathBuf,
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
            .env("CONTAINER_LOG", "info,container_apiserver=debug")
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

/// What the guest agent prints on the console when init ignored the stop signal and the
/// timeout ran out: a clean stop never shows it.
pub const FORCED_POWER_OFF: &str = "init did not stop the machine in time";

/// The last `n` lines of a text.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Fails in CI, skips with a message elsewhere, when a prerequisite is missing.
pub fn require(ok: bool, what: &str) -> bool {
    if ok {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("prerequisite missing in CI: {what}");
    }
    eprintln!("skipping: {what}");
    false
}

/// True when running as root (the service and VMs need it).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A host user for tests that must run as a regular (non-root) caller.
#[derive(Debug, Clone)]
pub struct TestUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

impl TestUser {
    /// The user with `uid`, created (with a home and bash) as `name` when no user has it.
    pub fn ensure(name: &str, uid: u32) -> Self {
        let existing = nix::unistd::User::from_uid(uid.into()).ok().flatten();
        let user = match existing {
            Some(u) => u,
            None => {
                run_ok(Command::new("useradd").args([
                    "--create-home",
                    "--shell",
                    "/bin/bash",
                    "--uid",
                    &uid.to_string(),
                    "--user-group",
                    name,
                ]));
                nix::unistd::User::from_uid(uid.into())
                    .ok()
                    .flatten()
                    .expect("the user just created")
            }
        };
        std::fs::create_dir_all(&user.dir).ok();
        let _ = nix::unistd::chown(&user.dir, Some(user.uid), Some(user.gid));
        Self {
            name: user.name,
            uid,
            gid: user.gid.as_raw(),
            home: user.dir,
        }
    }

    /// A `container` command run as this user from `cwd`.
    pub fn command(&self, service: &Service, cwd: &Path, args: &[&str]) -> Command {
        use std::os::unix::process::CommandExt;
        let mut c = service.command(args);
        c.uid(self.uid)
            .gid(self.gid)
            .current_dir(cwd)
            .env("HOME", &self.home)
            .env("USER", &self.name);
        c
    }

    /// Runs `container ARGS` as this user from their home; returns stdout or fails the test.
    pub fn cli_ok(&self, service: &Service, args: &[&str]) -> String {
        self.cli_ok_in(service, &self.home.clone(), args)
    }

    pub fn cli_ok_in(&self, service: &Service, cwd: &Path, args: &[&str]) -> String {
        let out = self
            .command(service, cwd, args)
            .output()
            .expect("run container");
        assert!(
            out.status.success(),
            "container {args:?} as {} failed ({}):\nstdout: {}\nstderr: {}\nservice log tail:\n{}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            tail(&service.log(), 60)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn cli(&self, service: &Service, args: &[&str]) -> Output {
        self.command(service, &self.home.clone(), args)
            .output()
            .expect("run container")
    }
}

/// Config lines that point a test service at a kernel installed once and shared by all tests
/// (`container system kernel set --recommended`, run in a cache root).
pub fn kernel_config() -> String {
    static KERNEL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    KERNEL
        .get_or_init(|| {
            let cache = std::env::var_os("CONTAINER_TEST_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                        .join(".cache/container-test-images")
                })
                .join("kernel-root");
            let lock = cache.with_extension("lock");
            std::fs::create_dir_all(cache.parent().unwrap()).unwrap();
            // One test process installs; the others wait on the lock.
            let lock_file = std::fs::File::create(&lock).unwrap();
            let _guard = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
                .expect("lock the kernel cache");
            let info = cache.join("kernel.json");
            if !info.exists() {
                let service = Service::start_in(&cache);
                let out = service.cli_ok(&["system", "status", "--format", "json"]);
                let status: serde_json::Value = serde_json::from_str(&out).unwrap();
                if status["kernel"].is_null() {
                    service.cli_ok(&["system", "kernel", "set", "--recommended"]);
                }
                let out = service.cli_ok(&["system", "status", "--format", "json"]);
                let status: serde_json::Value = serde_json::from_str(&out).unwrap();
                std::fs::write(&info, status["kernel"].to_string()).unwrap();
            }
            let kernel: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&info).unwrap()).unwrap();
            let mut text = format!("[kernel]\nbinary = {}\n", kernel["path"]);
            if let Some(m) = kernel["modules"].as_str() {
                text.push_str(&format!("modules = \"{m}\"\n"));
            }
            text
        })
        .clone()
}
