//! The CLI's exit codes, end to end: each kind of failure a script may want to tell apart exits
//! with the code `container --help` documents, and says what went wrong in one line. Nothing
//! here boots a machine.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use container_e2e::{Service, TestUser, install_bin, is_root, require, run_ok, test_image};

/// Asserts the exit code and a one-line message containing `needle`.
fn fails_with(out: &Output, code: i32, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    assert!(err.contains(needle), "expected `{needle}` in: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}

#[test]
fn failures_exit_with_the_documented_codes() {
    if !require(is_root(), "the service runs as root") {
        return;
    }
    let service = Service::start("");

    // The table is in the top-level help.
    let help = service.cli_ok(&["--help"]);
    for line in [
        "3  no such machine",
        "4  permission denied",
        "6  the container service",
    ] {
        assert!(help.contains(line), "`{line}` missing from --help:\n{help}");
    }

    fails_with(&service.cli(&["machine", "inspect", "nope"]), 3, "nope");
    // `run` fails before any command started: the table's code, not a command's status.
    fails_with(
        &service.cli(&["machine", "run", "-n", "nope", "true"]),
        3,
        "nope",
    );
    // Without a name and with no default machine there is nothing to act on.
    fails_with(
        &service.cli(&["machine", "stop"]),
        3,
        "there is no default machine",
    );

    let alice = TestUser::ensure("ctalice", 1500);
    fails_with(
        &alice.cli(&service, &["system", "stop"]),
        4,
        "only root can stop the container service",
    );
    assert!(service.cli(&["system", "status"]).status.success());

    // clap's usage errors: 2, with clap's message (and its usage hint, so not one line).
    let out = service.cli(&["machine", "ls", "--no-such-flag"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: unexpected argument"));
    // One the CLI finds itself, past clap.
    fails_with(
        &service.cli(&["machine", "cp", "/etc/hostname", "/tmp/hostname"]),
        2,
        "one side of `cp` must be a machine path",
    );

    // A machine from an image loaded from an archive, never booted.
    let archive = service.dir.path().join("busybox.tar");
    run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(test_image("busybox"))
            .arg("-cf")
            .arg(&archive)
            .arg("."),
    );
    let loaded = service.cli_ok(&["image", "load", "-i", archive.to_str().unwrap()]);
    let image = loaded
        .trim()
        .strip_prefix("Loaded image: ")
        .unwrap_or_else(|| panic!("unexpected load output: {loaded}"))
        .to_string();
    service.cli_ok(&["machine", "create", &image, "--no-boot", "--name", "dev"]);

    // A value the service refuses is a usage error as well.
    fails_with(
        &service.cli(&[
            "machine",
            "create",
            &image,
            "--no-boot",
            "--name",
            "Bad_Name",
        ]),
        2,
        "invalid machine name",
    );
    fails_with(
        &service.cli(&["machine", "create", &image, "--no-boot", "--name", "dev"]),
        5,
        "already exists",
    );
    fails_with(&service.cli(&["image", "rm", &image]), 5, "dev");
    assert_eq!(service.cli_ok(&["machine", "ls", "-q"]).trim(), "dev");
    service.cli_ok(&["machine", "rm", "dev"]);
}

/// `container ARGS` aimed at `socket`, as `user` when given.
fn cli_at(socket: &Path, user: Option<&TestUser>, args: &[&str]) -> Output {
    let mut c = Command::new(install_bin("container"));
    c.args(args)
        .env("CONTAINER_SOCKET", socket)
        .stdin(Stdio::null());
    if let Some(u) = user {
        c.uid(u.uid)
            .gid(u.gid)
            .current_dir(&u.home)
            .env("HOME", &u.home);
    }
    c.output().expect("run container")
}

#[test]
fn without_a_service_the_cli_says_so_and_exits_6() {
    let dir = tempfile::tempdir().unwrap();
    // Let a test user reach into it: a socket it may not open would be a permission error.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let absent = dir.path().join("absent.sock");
    // A socket nobody listens on any more: connecting is refused rather than not found.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());

    for socket in [&absent, &stale] {
        // `system status` never starts the service, even as root.
        fails_with(
            &cli_at(socket, None, &["system", "status"]),
            6,
            "the container service is not running",
        );
    }
    // Other commands start it on first use, but only for root; a user is told to.
    let user = is_root().then(|| TestUser::ensure("ctalice", 1500));
    fails_with(
        &cli_at(&absent, user.as_ref(), &["machine", "ls"]),
        6,
        "sudo container system start",
    );
    assert!(
        !absent.exists(),
        "a service was started on {}",
        absent.display()
    );
}
