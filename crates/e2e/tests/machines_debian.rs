//! `container machine` end to end on Debian 12 images with systemd: sudo, systemd reaching
//! running, a login shell on a terminal, the uid-1000 collision, create-user.sh, and state
//! surviving a service restart with the machine still running.

use std::process::Command;
use std::time::{Duration, Instant};

use container_e2e::{
    FORCED_POWER_OFF, Registry, Service, TestUser, is_root, kernel_config, require, run_ok,
    test_image,
};

fn config() -> String {
    format!("[machine]\ncpus = 2\nmemory = \"1G\"\n{}", kernel_config())
}

#[test]
fn systemd_sudo_and_a_login_shell() {
    if !require(is_root(), "the service runs as root") {
        return;
    }
    let registry = Registry::start();
    let image = registry.push(&test_image("debian"), "tests/debian:12");
    let service = Service::start(&config());
    let alice = TestUser::ensure("ctalice", 1500);

    // `--wait` returns once systemd has finished booting, and `ls` says so.
    alice.cli_ok(
        &service,
        &["machine", "create", &image, "--name", "deb", "--wait"],
    );
    let ls = alice.cli_ok(&service, &["machine", "ls"]);
    assert!(ls.contains("running") && !ls.contains("booting"), "{ls}");
    let out = alice.cli(
        &service,
        &[
            "machine",
            "run",
            "-n",
            "deb",
            "systemctl",
            "is-system-running",
        ],
    );
    let state = String::from_utf8_lossy(&out.stdout);
    assert!(matches!(state.trim(), "running" | "degraded"), "{state}");
    assert_eq!(
        alice
            .cli_ok(
                &service,
                &[
                    "machine", "run", "-n", "deb", "ps", "-o", "comm=", "-p", "1"
                ]
            )
            .trim(),
        "systemd"
    );
    alice.cli_ok(
        &service,
        &["machine", "run", "-n", "deb", "sudo", "-n", "true"],
    );
    let sudoers = alice.cli_ok(
        &service,
        &["machine", "run", "-n", "deb", "ls", "/etc/sudoers.d"],
    );
    assert!(
        sudoers.lines().all(|l| !l.contains('.')),
        "sudo ignores files with dots: {sudoers}"
    );

    // The interactive shell is a login shell in the directory we came from, on a terminal.
    let session = format!("ct-{}", std::process::id());
    let bin = container_e2e::install_bin("container");
    let project = alice.home.join("shell-here");
    std::fs::create_dir_all(&project).unwrap();
    nix::unistd::chown(&project, Some(alice.uid.into()), Some(alice.gid.into())).unwrap();
    let command = format!(
        "cd {} && CONTAINER_SOCKET={} HOME={} {} machine run -n deb",
        project.display(),
        service.socket.display(),
        alice.home.display(),
        bin.display()
    );
    run_ok(Command::new("tmux").args([
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "120",
        "-y",
        "40",
        "setpriv",
        &format!("--reuid={}", alice.uid),
        &format!("--regid={}", alice.gid),
        "--init-groups",
        "sh",
        "-c",
        &command,
    ]));
    let send = |keys: &str| {
        run_ok(Command::new("tmux").args(["send-keys", "-t", &session, keys, "Enter"]));
    };
    let screen = || run_ok(Command::new("tmux").args(["capture-pane", "-p", "-t", &session]));
    let wait_for = |needle: &str| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = screen();
            if s.contains(needle) {
                return s;
            }
            assert!(Instant::now() < deadline, "never saw {needle:?} on:\n{s}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    send("echo login=$0 tty=$(tty) dir=$(pwd) size=$(stty size)");
    let s = wait_for("login=-");
    let line = s.lines().rev().find(|l| l.contains("login=-")).unwrap();
    assert!(line.contains("login=-"), "not a login shell: {line}");
    assert!(line.contains("tty=/dev/pts/"), "{line}");
    assert!(
        line.contains(&format!("dir={}", project.display())),
        "{line}"
    );
    assert!(line.contains("size=40 120"), "{line}");
    run_ok(Command::new("tmux").args(["resize-window", "-t", &session, "-x", "100", "-y", "30"]));
    std::thread::sleep(Duration::from_millis(500));
    send("echo resized=$(stty size)");
    wait_for("resized=30 100");
    // Ctrl-C reaches the foreground process inside, not the CLI: the shell lives on.
    send("sleep 600");
    std::thread::sleep(Duration::from_secs(1));
    run_ok(Command::new("tmux").args(["send-keys", "-t", &session, "C-c"]));
    send("echo after-interrupt=$?");
    wait_for("after-interrupt=130");
    send("exit");
    let _ = Command::new("tmux")
        .args(["kill-session", "-t", &session])
        .output();

    alice.cli_ok(&service, &["machine", "stop", "deb"]);
    assert!(alice.cli_ok(&service, &["m", "ls"]).contains("stopped"));
    // systemd powered the machine off itself: the agent never had to force it.
    let console = alice.cli_ok(&service, &["machine", "logs", "deb"]);
    assert!(console.contains("stopping: signal"), "{console}");
    // `logs` shows systemd's status lines, and not the kernel's noise.
    assert!(console.contains("Reached target"), "{console}");
    assert!(!console.contains("PCI: Fatal"), "{console}");
    assert!(!console.contains(FORCED_POWER_OFF), "{console}");
}

#[test]
fn the_host_user_takes_uid_1000_from_the_images_account() {
    if !require(is_root(), "the service runs as root") {
        return;
    }
    let registry = Registry::start();
    let image = registry.push(&test_image("uid1000"), "tests/uid1000:1");
    let service = Service::start(&config());
    let user = TestUser::ensure("ctuid1000", 1000);
    user.cli_ok(
        &service,
        &[
            "machine",
            "create",
            &image,
            "--name",
            "collide",
            "--home-mount",
            "none",
        ],
    );
    // A stop right after the boot, before systemd has set up its signals, still lets
    // systemd power the machine off rather than the timeout force it.
    user.cli_ok(&service, &["machine", "stop", "collide"]);
    let console = user.cli_ok(&service, &["machine", "logs", "collide"]);
    assert!(!console.contains(FORCED_POWER_OFF), "{console}");
    let id = user.cli_ok(&service, &["machine", "run", "-n", "collide", "id"]);
    assert!(id.contains(&format!("uid=1000({})", user.name)), "{id}");
    user.cli_ok(
        &service,
        &["machine", "run", "-n", "collide", "sudo", "-n", "true"],
    );
    let passwd = user.cli_ok(
        &service,
        &[
            "machine", "run", "-n", "collide", "getent", "passwd", "1000",
        ],
    );
    assert!(passwd.starts_with(&format!("{}:", user.name)), "{passwd}");
    // home-mount none: the home is a local directory owned by the user, filled from skel.
    let home = user.cli_ok(
        &service,
        &[
            "machine",
            "run",
            "-n",
            "collide",
            "--no-shell",
            "sh",
            "-c",
            "stat -c %u $HOME; ls -a $HOME",
        ],
    );
    assert!(home.starts_with("1000"), "{home}");
    assert!(home.contains(".bashrc"), "{home}");
}

#[test]
fn create_user_script_replaces_the_built_in_setup() {
    if !require(is_root(), "the service runs as root") {
        return;
    }
    let registry = Registry::start();
    let image = registry.push(&test_image("createuser"), "tests/createuser:1");
    let service = Service::start(&config());
    let alice = TestUser::ensure("ctalice", 1500);
    alice.cli_ok(
        &service,
        &["machine", "create", &image, "--name", "scripted"],
    );
    // A stop right after the boot, before systemd has its signal handlers, still powers the
    // machine off cleanly rather than after the timeout by force.
    alice.cli_ok(&service, &["machine", "stop", "scripted"]);
    let console = alice.cli_ok(&service, &["machine", "logs", "scripted"]);
    assert!(!console.contains(FORCED_POWER_OFF), "{console}");
    alice.cli_ok(&service, &["machine", "start", "scripted"]);
    let env = alice.cli_ok(
        &service,
        &[
            "machine",
            "run",
            "-n",
            "scripted",
            "--root",
            "cat",
            "/var/log/create-user.env",
        ],
    );
    for expected in [
        format!("CONTAINER_USER={}", alice.name),
        format!("CONTAINER_UID={}", alice.uid),
        format!("CONTAINER_GID={}", alice.gid),
        format!("CONTAINER_HOME={}", alice.home.display()),
        "CONTAINER_MACHINE_ID=".to_string(),
    ] {
        assert!(env.contains(&expected), "{expected} missing in:\n{env}");
    }
    assert_eq!(
        alice
            .cli_ok(&service, &["machine", "run", "-n", "scripted", "whoami"])
            .trim(),
        alice.name
    );
}

#[test]
fn machines_survive_a_service_restart() {
    if !require(is_root(), "the service runs as root") {
        return;
    }
    let registry = Registry::start();
    let image = registry.push(&test_image("busybox"), "tests/busybox:1");
    let service = Service::start(&config());
    service.cli_ok(&[
        "machine", "create", &image, "--name", "survivor", "--memory", "512M",
    ]);
    service.cli_ok(&[
        "machine",
        "run",
        "-n",
        "survivor",
        "--no-shell",
        "sh",
        "-c",
        "echo before > /tmp/mark",
    ]);
    // A guest clock gone wrong (as after a host suspend) is set again by the service; the
    // first update comes as soon as a restarted service adopts the machine.
    service.cli_ok(&[
        "machine",
        "run",
        "-n",
        "survivor",
        "--root",
        "date",
        "-s",
        "@946684800",
    ]);
    service.kill_service();
    service.launch();
    let skew = |service: &Service| {
        let guest: i64 = service
            .cli_ok(&["machine", "run", "-n", "survivor", "date", "+%s"])
            .trim()
            .parse()
            .unwrap();
        (guest - host_now()).abs()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while skew(&service) > 5 {
        assert!(Instant::now() < deadline, "the guest clock was not set");
        std::thread::sleep(Duration::from_millis(500));
    }
    let ls = service.cli_ok(&["m", "ls"]);
    assert!(
        ls.contains("running"),
        "the machine was not re-adopted:\n{ls}"
    );
    assert_eq!(
        service
            .cli_ok(&["machine", "run", "-n", "survivor", "cat", "/tmp/mark"])
            .trim(),
        "before"
    );
    service.stop_service();
    service.launch();
    assert!(service.cli_ok(&["m", "ls"]).contains("running"));
    service.cli_ok(&["machine", "stop", "survivor"]);
}

/// The host's time in seconds since the epoch.
fn host_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}
