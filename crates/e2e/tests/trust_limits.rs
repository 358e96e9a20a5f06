//! `[limits]` end to end: a regular user who asks for more than a limit gets a clear error
//! naming the key that raises it, exit code 4, and nothing left behind (no machine, no
//! lease, no running VM, no spooled upload); a machine over the host's memory is a usage
//! error (exit 2) for everyone. Nothing boots: each limit is checked before anything is made.

use std::io::Write;
use std::path::Path;
use std::process::{Output, Stdio};

use container_e2e::{Registry, Service, TestUser, is_root, require, test_image};

const CONFIG: &str = "[limits]\nmachines = 2\nrunning-cpus = 1\nrunning-memory = \"512M\"\n\
                      disk-size = \"2G\"\nimage-load-size = \"1M\"\n";

/// Asserts the exit code and that stderr names `needle`.
fn fails_with(out: &Output, code: i32, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    assert!(err.contains(needle), "expected `{needle}` in: {err}");
}

/// The names of the machine directories and leases the service holds.
fn leftovers(service: &Service) -> String {
    let machines: Vec<String> = std::fs::read_dir(service.root.join("machines"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let leases =
        std::fs::read_to_string(service.root.join("network/leases.json")).unwrap_or_default();
    format!("machines: {machines:?}\nleases: {leases}")
}

fn entries(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn each_limit_is_refused_clearly_and_leaves_nothing_behind() {
    if !require(is_root(), "the service runs as root") {
        return;
    }
    let registry = Registry::start();
    let image = registry.push(&test_image("busybox"), "tests/busybox:1");
    let service = Service::start(CONFIG);
    let alice = TestUser::ensure("ctalice", 1500);
    let bob = TestUser::ensure("ctbob", 1501);
    let create = |who: &TestUser, name: &str, extra: &[&str]| {
        let mut args = vec!["machine", "create", &image, "--name", name, "--no-boot"];
        args.extend_from_slice(extra);
        who.cli(&service, &args)
    };

    // Disk size per machine.
    fails_with(
        &create(&alice, "big-disk", &["--disk-size", "4G"]),
        4,
        "limits.disk-size",
    );
    // Two machines, then no more.
    let small = ["--disk-size", "1G"];
    assert!(
        create(
            &alice,
            "a",
            &["--cpus", "2", "--memory", "256M", "--disk-size", "1G"]
        )
        .status
        .success()
    );
    assert!(
        create(
            &alice,
            "b",
            &["--cpus", "1", "--memory", "1G", "--disk-size", "1G"]
        )
        .status
        .success()
    );
    fails_with(&create(&alice, "over-count", &small), 4, "limits.machines");
    // Running totals, checked before anything boots.
    fails_with(
        &alice.cli(&service, &["machine", "start", "a"]),
        4,
        "limits.running-cpus",
    );
    fails_with(
        &alice.cli(&service, &["machine", "start", "b"]),
        4,
        "limits.running-memory",
    );
    // More memory than the host has: refused for everyone, root included.
    fails_with(
        &create(&bob, "huge-mem", &["--memory", "2T"]),
        2,
        "the host's memory",
    );
    fails_with(
        &service.cli(&[
            "machine",
            "create",
            &image,
            "--name",
            "huge-root",
            "--no-boot",
            "--memory",
            "2T",
        ]),
        2,
        "the host's memory",
    );

    let left = leftovers(&service);
    for refused in ["big-disk", "over-count", "huge-mem", "huge-root"] {
        assert!(!left.contains(refused), "{refused} left behind:\n{left}");
    }
    let ls = alice.cli_ok(&service, &["machine", "ls", "-q"]);
    assert_eq!(ls.split_whitespace().collect::<Vec<_>>(), ["a", "b"]);
    assert_eq!(entries(&service.run_dir.join("vm")), 0, "a VM was started");
    assert!(
        !alice
            .cli_ok(&service, &["machine", "ls"])
            .contains("running")
    );

    // An upload over the cap stops at it, and nothing of it stays. The user's is larger than
    // what the service drains past the cap before it answers (64 MiB), so the refusal
    // reaches a client still sending.
    let load = |root: bool, size: usize| {
        let mut c = match root {
            true => service.command(&["image", "load"]),
            false => alice.command(&service, &alice.home, &["image", "load"]),
        };
        let mut child = c
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        // The CLI may stop reading once the service refused.
        let _ = stdin.write_all(&vec![0u8; size]);
        drop(stdin);
        child.wait_with_output().unwrap()
    };
    let images_before = alice.cli_ok(&service, &["image", "ls"]);
    fails_with(&load(false, 80 << 20), 4, "limits.image-load-size");
    assert_eq!(entries(&service.root.join("images/work")), 0);
    assert_eq!(entries(&service.root.join("images/ingest")), 0);
    assert_eq!(alice.cli_ok(&service, &["image", "ls"]), images_before);
    // Root is not capped: its upload is read whole (whatever it then makes of zeros).
    let out = load(true, 3 << 20);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("limits."), "{err}");
}
