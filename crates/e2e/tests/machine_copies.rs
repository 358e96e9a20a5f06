//! Clones, snapshots and rename end to end on a Debian machine with systemd: a clone of a
//! stopped machine costs the same whatever its disk holds and a clone of a running one is
//! consistent with the source still running; each copy has its own files from the copy on,
//! its own machine-id and host name; a snapshot brings the disk back; another user can do
//! none of it; removing either side of a clone leaves the other whole.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Instant;

use container_e2e::{Registry, Service, TestUser, is_root, kernel_config, require, test_image};

fn config() -> String {
    format!(
        "[machine]\ncpus = 1\nmemory = \"512M\"\n{}",
        kernel_config()
    )
}

/// Bytes allocated on the host under `dir`.
fn usage(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let meta = entry.metadata().unwrap();
        total += match meta.is_dir() {
            true => usage(&entry.path()),
            false => meta.blocks() * 512,
        };
    }
    total
}

/// Runs a shell line as root in the machine; its stdout.
fn root_sh(user: &TestUser, service: &Service, machine: &str, line: &str) -> String {
    user.cli_ok(
        service,
        &[
            "machine",
            "run",
            "-n",
            machine,
            "--root",
            "--no-shell",
            "sh",
            "-c",
            line,
        ],
    )
}

/// Which of the marker files exist in the machine (written outside the home, on its disk).
fn marks(user: &TestUser, service: &Service, machine: &str) -> String {
    root_sh(
        user,
        service,
        machine,
        "cd /var/tmp && ls mark-* 2>/dev/null | tr '\\n' ' '",
    )
    .trim()
    .to_string()
}

fn code(out: &std::process::Output) -> Option<i32> {
    out.status.code()
}

#[test]
fn clones_snapshots_and_rename_of_a_debian_machine() {
    if !require(is_root(), "the service runs as root") {
        return;
    }
    let registry = Registry::start();
    let image = registry.push(&test_image("debian"), "tests/debian:12");
    let service = Service::start(&config());
    let alice = TestUser::ensure("ctalice", 1500);
    let bob = TestUser::ensure("ctbob", 1501);
    let a = |args: &[&str]| alice.cli_ok(&service, args);

    a(&["machine", "create", &image, "--name", "src"]);
    // Commands run, so it is `running` at once, as Apple's scripts expect, while systemd
    // may still be booting (`booting: true`, `--wait` waits that out).
    let m: serde_json::Value = serde_json::from_str(&a(&["machine", "inspect", "src"])).unwrap();
    assert_eq!(m[0]["status"], "running", "{m}");
    let ls = a(&["machine", "ls"]);
    assert!(ls.contains("running"), "ls shows a state of its own: {ls}");
    root_sh(
        &alice,
        &service,
        "src",
        "echo x > /var/tmp/mark-before && sync",
    );
    let src_id = root_sh(&alice, &service, "src", "cat /etc/machine-id");
    // Some data on the disk, so a full copy would show.
    root_sh(
        &alice,
        &service,
        "src",
        "head -c 64M /dev/urandom > /var/tmp/bulk && sync",
    );
    let bulk = "sha256sum /var/tmp/bulk | cut -c1-64";
    let bulk_sum = root_sh(&alice, &service, "src", bulk);
    a(&["machine", "stop", "src"]);

    // Clone of a stopped machine: no copy of its 64 MiB.
    let before = usage(&service.root);
    let started = Instant::now();
    a(&["machine", "clone", "src", "cold"]);
    let took = started.elapsed();
    let grown = usage(&service.root).saturating_sub(before);
    println!("clone of a stopped machine: {took:?}, host usage grew by {grown} bytes");
    assert!(grown < 4 << 20, "a clone copied data: {grown} bytes");
    let cold_disk = service.root.join("machines/cold/disk.qcow2");
    assert!(std::fs::metadata(&cold_disk).unwrap().blocks() * 512 < 1 << 20);

    // Clone of a running machine: it keeps running.
    a(&["machine", "start", "src"]);
    root_sh(
        &alice,
        &service,
        "src",
        "echo x > /var/tmp/mark-src-1 && sync",
    );
    a(&["machine", "clone", "src", "warm"]);
    let ls = a(&["machine", "ls", "--format", "json"]);
    let ls: serde_json::Value = serde_json::from_str(&ls).unwrap();
    let status = |n: &str| {
        ls.as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == n)
            .map(|m| m["status"].as_str().unwrap().to_string())
    };
    assert_eq!(status("src").as_deref(), Some("running"));
    assert_eq!(status("warm").as_deref(), Some("stopped"));
    root_sh(
        &alice,
        &service,
        "src",
        "echo x > /var/tmp/mark-src-2 && sync",
    );

    // Each copy has what was there at its copy, and its own files after.
    a(&["machine", "start", "cold"]);
    root_sh(
        &alice,
        &service,
        "cold",
        "echo x > /var/tmp/mark-cold && sync",
    );
    a(&["machine", "start", "warm"]);
    assert_eq!(marks(&alice, &service, "cold"), "mark-before mark-cold");
    assert_eq!(marks(&alice, &service, "warm"), "mark-before mark-src-1");
    assert_eq!(
        marks(&alice, &service, "src"),
        "mark-before mark-src-1 mark-src-2"
    );
    for copy in ["cold", "warm"] {
        let id = root_sh(&alice, &service, copy, "cat /etc/machine-id");
        assert_ne!(id.trim(), src_id.trim(), "{copy} kept the machine-id");
        assert_eq!(
            root_sh(&alice, &service, copy, "cat /proc/sys/kernel/hostname").trim(),
            copy
        );
        // The user is set up for the copy: alice's account works there.
        let me = alice.cli_ok(&service, &["machine", "run", "-n", copy, "id", "-un"]);
        assert_eq!(me.trim(), "ctalice");
    }
    for m in ["src", "cold", "warm"] {
        assert_eq!(root_sh(&alice, &service, m, bulk), bulk_sum, "{m}");
    }

    // Another user can do none of this to alice's machines.
    for args in [
        vec!["machine", "clone", "src", "stolen"],
        vec!["machine", "snapshot", "create", "src", "s"],
        vec!["machine", "snapshot", "ls", "src"],
        vec!["machine", "rename", "cold", "mine"],
    ] {
        let out = bob.cli(&service, &args);
        assert_eq!(code(&out), Some(3), "{args:?}: {out:?}");
    }
    assert!(!service.root.join("machines/stolen").exists());

    // Snapshot of the running machine, changes, restore: the files come back.
    a(&["machine", "snapshot", "create", "src", "s1"]);
    root_sh(
        &alice,
        &service,
        "src",
        "rm /var/tmp/mark-before && echo x > /var/tmp/mark-late && sync",
    );
    let out = alice.cli(&service, &["machine", "snapshot", "restore", "src", "s1"]);
    assert_eq!(code(&out), Some(5), "restore of a running machine: {out:?}");
    let snaps = a(&["machine", "snapshot", "ls", "src", "--format", "json"]);
    let snaps: serde_json::Value = serde_json::from_str(&snaps).unwrap();
    assert_eq!(snaps[0]["name"], "s1");
    assert!(snaps[0]["createdDate"].as_str().unwrap().ends_with('Z'));
    assert!(snaps[0]["size"].as_u64().unwrap() > 0);
    a(&["machine", "snapshot", "restore", "-f", "src", "s1"]);
    a(&["machine", "start", "src"]);
    assert_eq!(
        marks(&alice, &service, "src"),
        "mark-before mark-src-1 mark-src-2"
    );
    a(&["machine", "snapshot", "rm", "src", "s1"]);
    assert!(
        a(&["machine", "snapshot", "ls", "src", "-q"])
            .trim()
            .is_empty()
    );
    let out = alice.cli(&service, &["machine", "snapshot", "rm", "src", "s1"]);
    assert_eq!(code(&out), Some(3), "{out:?}");

    // Either side of a clone may go first: the other keeps its files.
    a(&["machine", "rm", "-f", "src"]);
    a(&["machine", "restart", "warm"]);
    assert_eq!(marks(&alice, &service, "warm"), "mark-before mark-src-1");

    // Rename: stopped only; the default pointer follows.
    let out = alice.cli(&service, &["machine", "rename", "cold", "renamed"]);
    assert_eq!(code(&out), Some(5), "rename of a running machine: {out:?}");
    a(&["machine", "stop", "cold"]);
    a(&["machine", "set-default", "cold"]);
    a(&["machine", "rename", "cold", "renamed"]);
    let ls = a(&["machine", "ls", "--format", "json"]);
    let ls: serde_json::Value = serde_json::from_str(&ls).unwrap();
    let renamed = ls.as_array().unwrap().iter().find(|m| m["id"] == "renamed");
    assert_eq!(
        renamed.map(|m| m["default"].clone()),
        Some(true.into()),
        "{ls}"
    );
    a(&["machine", "start", "renamed"]);
    assert_eq!(
        root_sh(&alice, &service, "renamed", "cat /proc/sys/kernel/hostname").trim(),
        "renamed"
    );
    assert_eq!(marks(&alice, &service, "renamed"), "mark-before mark-cold");

    a(&["machine", "rm", "-f", "renamed", "warm"]);
    let left = std::fs::read_dir(service.root.join("layers"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(left, 0, "layers left after every machine went");
}

#[test]
fn each_of_several_live_clones_boots_beside_its_running_source() {
    if !require(is_root(), "the service runs as root") {
        return;
    }
    let registry = Registry::start();
    let image = registry.push(&test_image("busybox"), "tests/busybox:1");
    let service = Service::start(&format!(
        "[machine]\ncpus = 1\nmemory = \"256M\"\nhome-mount = \"none\"\n{}",
        kernel_config()
    ));
    service.cli_ok(&["machine", "create", &image, "--name", "src"]);
    // Each clone freezes the source's top into a new shared layer, the source goes on over
    // a fresh overlay: the second one freezes the overlay the first one switched it to.
    for (i, clone) in ["c1", "c2", "c3"].iter().enumerate() {
        let mark = format!("echo {i} > /mark-{i} && sync");
        service.cli_ok(&["machine", "run", "--root", "-n", "src", &mark]);
        service.cli_ok(&["machine", "clone", "src", clone]);
        let seen = service.cli_ok(&["machine", "run", "--root", "-n", clone, "cat /mark-*"]);
        let want: Vec<String> = (0..=i).map(|n| n.to_string()).collect();
        assert_eq!(seen.split_whitespace().collect::<Vec<_>>(), want, "{clone}");
    }
    let out = service.cli_ok(&["machine", "run", "--root", "-n", "src", "echo alive"]);
    assert_eq!(out.trim(), "alive");
}
