//! `container machine` end to end on the busybox test image, as a regular host user, under
//! software emulation: the quickstart, host integration, lifecycle, cp, logs, and bad input.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use container_e2e::{
    FORCED_POWER_OFF, Registry, Service, TestUser, is_root, kernel_config, require, tail,
    test_image,
};

fn config() -> String {
    format!(
        "[machine]\ncpus = 1\nmemory = \"512M\"\n{}",
        kernel_config()
    )
}

#[test]
fn quickstart_and_host_integration_on_busybox() {
    if !require(is_root(), "the service runs as root") {
        return;
    }
    let registry = Registry::start();
    let image = registry.push(&test_image("busybox"), "tests/busybox:1");
    let service = Service::start(&config());
    let alice = TestUser::ensure("ctalice", 1500);
    let project = alice.home.join("project");
    std::fs::create_dir_all(&project).unwrap();
    nix::unistd::chown(&project, Some(alice.uid.into()), Some(alice.gid.into())).unwrap();

    // The quickstart, verbatim.
    let out = alice.cli_ok(&service, &["machine", "create", &image, "--name", "dev"]);
    assert_eq!(out.trim(), "dev");
    assert_eq!(
        alice
            .cli_ok(&service, &["machine", "run", "-n", "dev", "whoami"])
            .trim(),
        alice.name
    );
    let pwd = alice.cli_ok_in(&service, &project, &["machine", "run", "-n", "dev", "pwd"]);
    assert_eq!(pwd.trim(), project.display().to_string());
    // No command: a login shell. The host user's bash is not in this image: its sh is used.
    let mut shell = alice
        .command(&service, &project, &["machine", "run", "-n", "dev", "-i"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    shell
        .stdin
        .take()
        .unwrap()
        .write_all(b"echo shell=$0 dir=$(pwd)\n")
        .unwrap();
    let out = shell.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        text.trim(),
        format!("shell=-sh dir={}", project.display()),
        "a login shell in the caller's directory"
    );
    alice.cli_ok(&service, &["machine", "set-default", "dev"]);
    let ls = alice.cli_ok(&service, &["m", "ls"]);
    let header: Vec<&str> = ls.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME", "IMAGE", "CREATED", "IP", "CPUS", "MEMORY", "DISK", "STATE", "DEFAULT"
        ]
    );
    assert!(ls.contains("running") && ls.contains('*'), "{ls}");

    // Same identity inside as outside.
    let id = alice.cli_ok(&service, &["machine", "run", "id"]);
    assert!(
        id.contains(&format!("uid={}({})", alice.uid, alice.name)),
        "{id}"
    );
    assert!(id.contains(&format!("gid={}", alice.gid)), "{id}");
    assert_eq!(
        alice
            .cli_ok(&service, &["machine", "run", "hostname"])
            .trim(),
        "dev"
    );
    assert_eq!(
        alice
            .cli_ok(&service, &["machine", "run", "uname", "-s"])
            .trim(),
        "Linux"
    );

    // Exit codes pass through; a missing command says so.
    let out = alice.cli(
        &service,
        &["machine", "run", "--no-shell", "sh", "-c", "exit 42"],
    );
    assert_eq!(out.status.code(), Some(42));
    let out = alice.cli(&service, &["machine", "run", "no-such-command"]);
    assert_eq!(
        out.status.code(),
        Some(127),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Files made inside the shared home appear on the host, owned by the user.
    alice.cli_ok_in(
        &service,
        &project,
        &[
            "machine",
            "run",
            "--no-shell",
            "sh",
            "-c",
            "echo hi > made-inside",
        ],
    );
    let made = project.join("made-inside");
    assert_eq!(std::fs::read_to_string(&made).unwrap(), "hi\n");
    assert_eq!(std::fs::metadata(&made).unwrap().uid(), alice.uid);

    // -e, --env-file and -w.
    let env_file = project.join("env");
    std::fs::write(&env_file, "# comment\nFROM_FILE=yes\n").unwrap();
    let out = alice.cli_ok(
        &service,
        &[
            "machine",
            "run",
            "-e",
            "GREETING=hello",
            "--env-file",
            env_file.to_str().unwrap(),
            "-w",
            "/tmp",
            "--no-shell",
            "sh",
            "-c",
            "echo $GREETING $FROM_FILE $(pwd)",
        ],
    );
    assert_eq!(out.trim(), "hello yes /tmp");
    assert_eq!(
        alice
            .cli_ok(&service, &["machine", "run", "--root", "id", "-u"])
            .trim(),
        "0"
    );

    // cp both ways, a directory tree byte for byte.
    let tree = project.join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("a.txt"), "alpha").unwrap();
    std::fs::write(tree.join("sub/b.bin"), [0u8, 1, 2, 255]).unwrap();
    let tree_str = tree.to_str().unwrap().to_string();
    // Give the tree to alice: cp reads host files as the caller.
    std::process::Command::new("chown")
        .args(["-R", &format!("{}:{}", alice.uid, alice.gid), &tree_str])
        .status()
        .unwrap();
    alice.cli_ok(&service, &["machine", "cp", &tree_str, "dev:/tmp/copied"]);
    let listing = alice.cli_ok(&service, &["machine", "run", "cat", "/tmp/copied/a.txt"]);
    assert_eq!(listing, "alpha");
    let back = project.join("back");
    alice.cli_ok(
        &service,
        &["machine", "cp", "dev:/tmp/copied", back.to_str().unwrap()],
    );
    assert_eq!(
        std::fs::read(back.join("sub/b.bin")).unwrap(),
        [0u8, 1, 2, 255]
    );

    // logs: the boot log shows the agent; -n limits lines.
    let boot = alice.cli_ok(&service, &["machine", "logs", "--boot", "dev"]);
    assert!(boot.contains("container-agent"), "{boot}");
    let two = alice.cli_ok(&service, &["machine", "logs", "--boot", "-n", "2", "dev"]);
    assert!(two.lines().count() <= 2, "{two}");

    // Stop, and the disk keeps what was written; run boots it again.
    alice.cli_ok(
        &service,
        &[
            "machine",
            "run",
            "--root",
            "--no-shell",
            "sh",
            "-c",
            "echo kept > /var/kept",
        ],
    );
    alice.cli_ok(&service, &["machine", "stop", "dev"]);
    assert!(alice.cli_ok(&service, &["m", "ls"]).contains("stopped"));
    alice.cli_ok(&service, &["machine", "stop", "dev"]); // idempotent
    assert_eq!(
        alice
            .cli_ok(&service, &["machine", "run", "cat", "/var/kept"])
            .trim(),
        "kept"
    );

    // set: cpus after a restart.
    let out = alice
        .command(&service, Path::new("/"), &["machine", "set", "cpus=2"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("take effect"),
        "{out:?}"
    );
    alice.cli_ok(&service, &["machine", "stop", "dev"]);
    assert_eq!(
        alice.cli_ok(&service, &["machine", "run", "nproc"]).trim(),
        "2"
    );

    // Bad input: clear errors, each with its exit code, nothing changed.
    let bad = |args: &[&str], needle: &str, code: i32| {
        let out = alice.cli(&service, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    };
    bad(&["machine", "run", "-n", "nope", "true"], "not found", 3);
    bad(
        &["machine", "create", &image, "--name", "dev"],
        "already exists",
        5,
    );
    // A usage error: clap's message (with its usage hint) and exit code 2.
    let out = alice.cli(
        &service,
        &[
            "machine", "create", &image, "--name", "x", "--memory", "lots",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid size"));
    bad(&["machine", "set", "-n", "dev", "cpu=2"], "valid keys", 2);
    bad(&["machine", "rm", "dev"], "running", 5);
    bad(
        &[
            "machine",
            "create",
            &image,
            "--name",
            "y",
            "--mount",
            "/root:/data",
        ],
        "cannot mount",
        4,
    );
    assert_eq!(alice.cli_ok(&service, &["m", "ls", "-q"]).trim(), "dev");

    alice.cli_ok(&service, &["machine", "rm", "-f", "dev"]);
    assert_eq!(alice.cli_ok(&service, &["m", "ls", "-q"]).trim(), "");
}

#[test]
fn another_user_cannot_see_or_touch_a_machine() {
    if !require(is_root(), "the service runs as root") {
        return;
    }
    let registry = Registry::start();
    let image = registry.push(&test_image("busybox"), "tests/busybox:1");
    let service = Service::start(&config());
    let alice = TestUser::ensure("ctalice", 1500);
    let bob = TestUser::ensure("ctbob", 1501);
    alice.cli_ok(
        &service,
        &[
            "machine",
            "create",
            &image,
            "--name",
            "private",
            "--no-boot",
        ],
    );
    assert_eq!(bob.cli_ok(&service, &["m", "ls", "-q"]).trim(), "");
    for args in [
        vec!["machine", "inspect", "private"],
        vec!["machine", "run", "-n", "private", "true"],
        vec!["machine", "stop", "private"],
        vec!["machine", "rm", "-f", "private"],
    ] {
        let out = bob.cli(&service, &args);
        assert_eq!(out.status.code(), Some(3), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("not found"),
            "{args:?}"
        );
    }
    assert!(
        service.cli_ok(&["m", "ls", "-q"]).contains("private"),
        "root sees all"
    );
    assert_eq!(alice.cli_ok(&service, &["m", "ls", "-q"]).trim(), "private");
}

#[test]
fn images_without_init_are_refused_at_create() {
    if !require(is_root(), "the service runs as root") {
        return;
    }
    let registry = Registry::start();
    let image = registry.push(&test_image("noinit"), "tests/noinit:1");
    let service = Service::start(&config());
    let err = service.cli_err(&["machine", "create", &image, "--name", "x"]);
    assert!(err.contains("/sbin/init"), "{err}");
    assert_eq!(service.cli_ok(&["m", "ls", "-q"]).trim(), "");
}

#[test]
fn stop_is_clean_forced_only_when_init_ignores_the_signal_and_reboot_boots_again() {
    if !require(is_root(), "the service runs as root") {
        return;
    }
    let registry = Registry::start();
    let image = registry.push(&test_image("busybox"), "tests/busybox:1");
    let service = Service::start(&config());
    service.cli_ok(&["machine", "create", &image, "--name", "stopper"]);
    service.cli_ok(&[
        "machine",
        "run",
        "-n",
        "stopper",
        "--no-shell",
        "sh",
        "-c",
        "echo kept > /root/mark",
    ]);
    // busybox init powers off on its own signal, well within the timeout.
    service.cli_ok(&["machine", "stop", "stopper"]);
    let console = service.cli_ok(&["machine", "logs", "stopper"]);
    assert!(console.contains("stopping: signal"), "{console}");
    assert!(!console.contains(FORCED_POWER_OFF), "{console}");

    // A signal init ignores (PID 1 gets no signal it has no handler for): forced off
    // after --time, and the command still succeeds with the machine stopped.
    service.cli_ok(&["machine", "start", "stopper"]);
    let started = Instant::now();
    service.cli_ok(&[
        "machine", "stop", "--signal", "WINCH", "--time", "2", "stopper",
    ]);
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "the timeout was honoured"
    );
    let console = service.cli_ok(&["machine", "logs", "stopper"]);
    assert!(
        console.contains(FORCED_POWER_OFF),
        "{console}\nservice log tail:\n{}",
        tail(&service.log(), 30)
    );
    assert!(service.cli_ok(&["m", "ls"]).contains("stopped"));
    assert_eq!(
        service
            .cli_ok(&["machine", "run", "-n", "stopper", "cat", "/root/mark"])
            .trim(),
        "kept"
    );

    // `reboot` inside boots the machine again, as on any machine: QEMU runs with
    // -no-reboot, so the VM ends and the service starts it anew, with nobody calling
    // `start` (a `run` would boot a stopped machine itself, so none is made until then).
    let inspect = || -> serde_json::Value {
        let all: serde_json::Value = serde_json::from_str(
            &service.cli_ok(&["machine", "inspect", "stopper", "--format", "json"]),
        )
        .unwrap();
        all[0].clone()
    };
    let boot_id = || {
        service
            .cli_ok(&[
                "machine",
                "run",
                "-n",
                "stopper",
                "cat",
                "/proc/sys/kernel/random/boot_id",
            ])
            .trim()
            .to_string()
    };
    let before = (boot_id(), inspect()["startedDate"].clone());
    service.cli_ok(&["machine", "run", "-n", "stopper", "-d", "--root", "reboot"]);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let now = inspect();
        if now["status"] == "running" && now["startedDate"] != before.1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the machine did not come back after its reboot: {now}\n{}",
            container_e2e::tail(
                &service
                    .log()
                    .lines()
                    .filter(|l| !l.contains("request="))
                    .collect::<Vec<_>>()
                    .join("\n"),
                20
            )
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_ne!(boot_id(), before.0, "a fresh boot");
    let console = service.cli_ok(&["machine", "logs", "--boot", "stopper"]);
    assert!(console.contains("container-agent"), "{console}");
    assert_eq!(
        service
            .cli_ok(&["machine", "run", "-n", "stopper", "cat", "/root/mark"])
            .trim(),
        "kept"
    );

    // A guest kernel that panics (as when init dies) ends the VM for good: no reboot line,
    // so the machine stays stopped, and its console says why.
    service.cli_ok(&[
        "machine",
        "run",
        "-n",
        "stopper",
        "-d",
        "--root",
        "--no-shell",
        "sh",
        "-c",
        "echo c > /proc/sysrq-trigger",
    ]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while inspect()["status"] != "stopped" {
        assert!(Instant::now() < deadline, "the panicked machine still runs");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The service acts on a reboot within milliseconds of the exit; give it seconds.
    std::thread::sleep(Duration::from_secs(3));
    // Still this boot's console (a new boot starts a new one), and still stopped.
    let console = service.cli_ok(&["machine", "logs", "stopper"]);
    assert!(console.contains("Kernel panic"), "{console}");
    assert_eq!(inspect()["status"], "stopped", "a panic is not a reboot");
    service.cli_ok(&["machine", "start", "stopper"]);

    let bad = service.cli_err(&["machine", "stop", "--signal", "NOPE", "stopper"]);
    assert!(bad.contains("invalid signal"), "{bad}");
    service.cli_ok(&["machine", "stop", "stopper"]);
}

#[test]
fn interrupts_reach_the_command_and_logs_follow_the_console() {
    if !require(is_root(), "the service runs as root") {
        return;
    }
    let registry = Registry::start();
    let image = registry.push(&test_image("busybox"), "tests/busybox:1");
    let service = Service::start(&config());
    service.cli_ok(&["machine", "create", &image, "--name", "sig"]);

    // Without a terminal, SIGINT to `run` is forwarded: the command dies of it and `run`
    // exits 130 as a shell would report it.
    let mut run = service
        .command(&["machine", "run", "-n", "sig", "sleep", "600"])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !service
        .cli_ok(&["machine", "run", "-n", "sig", "ps", "-o", "comm"])
        .lines()
        .any(|l| l.trim() == "sleep")
    {
        assert!(Instant::now() < deadline, "sleep never started");
        std::thread::sleep(Duration::from_millis(200));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(run.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = run.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{status}");

    // `logs -f` shows what reaches the console while it runs.
    let mut follow = service
        .command(&["machine", "logs", "-f", "sig"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    service.cli_ok(&[
        "machine",
        "run",
        "-n",
        "sig",
        "--root",
        "--no-shell",
        "sh",
        "-c",
        "echo follow-marker > /dev/console",
    ]);
    let (tx, rx) = std::sync::mpsc::channel();
    let mut out = follow.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(&mut out)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("follow-marker") {
                let _ = tx.send(line);
                break;
            }
        }
    });
    let seen = rx.recv_timeout(Duration::from_secs(30));
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(seen.is_ok(), "logs -f never showed the marker");
    service.cli_ok(&["machine", "stop", "sig"]);
}

#[test]
fn a_read_only_home_and_extra_mounts_behave_as_asked() {
    if !require(is_root(), "the service runs as root") {
        return;
    }
    let registry = Registry::start();
    let image = registry.push(&test_image("busybox"), "tests/busybox:1");
    let service = Service::start(&config());
    let alice = TestUser::ensure("ctalice", 1500);
    let own = |p: &Path| {
        std::fs::create_dir_all(p).unwrap();
        nix::unistd::chown(p, Some(alice.uid.into()), Some(alice.gid.into())).unwrap();
    };
    let base = tempfile::Builder::new()
        .prefix("ct-mounts-")
        .tempdir_in("/tmp")
        .unwrap();
    let (data, refs) = (base.path().join("data"), base.path().join("refs"));
    own(base.path());
    own(&data.join("sub"));
    own(&refs);
    std::fs::write(refs.join("readme"), "reference\n").unwrap();
    std::fs::write(alice.home.join("dotfile"), "from the host\n").unwrap();
    let (data_arg, refs_arg) = (
        format!("{}:/data", data.display()),
        format!("{}:/refs:ro", refs.display()),
    );
    alice.cli_ok(
        &service,
        &[
            "machine",
            "create",
            &image,
            "--name",
            "mounts",
            "--home-mount",
            "ro",
            "--mount",
            &data_arg,
            "--mount",
            &refs_arg,
        ],
    );
    let run = |args: &[&str]| {
        let mut all = vec!["machine", "run", "-n", "mounts"];
        all.extend_from_slice(args);
        alice.cli(&service, &all)
    };
    // The home is the host's, read-only.
    let seen = run(&["cat", "dotfile"]);
    assert_eq!(String::from_utf8_lossy(&seen.stdout), "from the host\n");
    let write_home = run(&["--no-shell", "sh", "-c", "echo x > new-in-home"]);
    assert!(!write_home.status.success(), "the home is read-only");
    assert!(!alice.home.join("new-in-home").exists());
    // A read-write mount: what the machine writes lands on the host, owned by the user.
    let wrote = run(&["--no-shell", "sh", "-c", "echo inside > /data/sub/made"]);
    assert!(wrote.status.success(), "{wrote:?}");
    let made = data.join("sub/made");
    assert_eq!(std::fs::read_to_string(&made).unwrap(), "inside\n");
    assert_eq!(std::fs::metadata(&made).unwrap().uid(), alice.uid);
    // `run` from inside a mounted directory lands at its guest path.
    let pwd = alice.cli_ok_in(
        &service,
        &data.join("sub"),
        &["machine", "run", "-n", "mounts", "pwd"],
    );
    assert_eq!(pwd.trim(), "/data/sub");
    // A read-only mount.
    assert_eq!(
        String::from_utf8_lossy(&run(&["cat", "/refs/readme"]).stdout),
        "reference\n"
    );
    assert!(
        !run(&["--no-shell", "sh", "-c", "echo x > /refs/other"])
            .status
            .success()
    );
    assert!(!refs.join("other").exists());

    // home-mount changes at the next start, and `set` says so.
    let set = alice.cli(
        &service,
        &["machine", "set", "-n", "mounts", "home-mount=rw"],
    );
    assert!(set.status.success());
    let note = String::from_utf8_lossy(&set.stderr);
    assert!(
        note.contains("will take effect after stopping and starting"),
        "{note}"
    );
    alice.cli_ok(&service, &["machine", "stop", "mounts"]);
    alice.cli_ok(&service, &["machine", "start", "mounts"]);
    assert!(
        run(&["--no-shell", "sh", "-c", "echo x > new-in-home"])
            .status
            .success()
    );
    assert_eq!(
        std::fs::metadata(alice.home.join("new-in-home"))
            .unwrap()
            .uid(),
        alice.uid
    );
    std::fs::remove_file(alice.home.join("new-in-home")).unwrap();
    alice.cli_ok(&service, &["machine", "rm", "-f", "mounts"]);
}
