//! `container machine stats` end to end on the busybox test image, as a regular host user:
//! the figures of a running machine are within sane bounds and follow what the guest does
//! (memory it fills and frees, caches it drops), a stopped machine shows only its disk,
//! `inspect` carries the same figures, the stream refreshes, and another user's machine has
//! no figures for anyone but its owner. An idle machine gives its page cache back.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use container_api::stats::MachineStats;
use container_e2e::{Registry, Service, TestUser, is_root, kernel_config, require, test_image};

const MIB: u64 = 1 << 20;

/// Idle reclaim sooner than the default, so the test sees it.
fn config() -> String {
    format!(
        "[machine]\ncpus = 1\nmemory = \"512M\"\n[memory]\nreclaim-idle-after = \"15s\"\n{}",
        kernel_config()
    )
}

fn sample(user: &TestUser, service: &Service, args: &[&str]) -> Vec<MachineStats> {
    let mut all = vec!["machine", "stats", "--no-stream", "--format", "json"];
    all.extend_from_slice(args);
    serde_json::from_str(&user.cli_ok(service, &all)).expect("stats --format json is an array")
}

fn one(user: &TestUser, service: &Service) -> MachineStats {
    let mut s = sample(user, service, &["dev"]);
    assert_eq!(s.len(), 1);
    s.remove(0)
}

/// Samples until `done` holds, at most `limit`; the last sample either way.
fn until(
    user: &TestUser,
    service: &Service,
    limit: Duration,
    done: impl Fn(&MachineStats) -> bool,
) -> MachineStats {
    let deadline = Instant::now() + limit;
    loop {
        let s = one(user, service);
        if done(&s) || Instant::now() > deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn stats_follow_what_the_guest_does() {
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
            "dev",
            "--home-mount",
            "none",
        ],
    );

    // A running machine: every figure present and within bounds.
    let s = one(&alice, &service);
    assert_eq!(s.status.to_string(), "running");
    let host = s.host_memory.clone().expect("host memory of a running VM");
    assert!(
        host.processes.iter().any(|p| p.name.starts_with("qemu")),
        "the VMM is among the processes: {host:?}"
    );
    assert!(host.pss > 16 * MIB && host.pss <= host.rss, "{host:?}");
    assert!(
        host.rss < 512 * MIB + 512 * MIB,
        "no more than the guest's memory and the VMM's own: {host:?}"
    );
    let guest = s.guest_memory.expect("the agent answers");
    assert!(
        guest.total > 400 * MIB && guest.total <= 512 * MIB,
        "the guest sees about its 512M: {guest:?}"
    );
    assert!(guest.used > 0 && guest.used + guest.cache + guest.free <= guest.total);
    let cpu = s.cpu_percent.expect("a rate from two samples");
    assert!((0.0..=150.0).contains(&cpu), "one vCPU: {cpu}");
    assert!(s.cpu_time_ns.unwrap() > 0);
    assert!(s.disk.allocated > 0 && s.disk.size > s.disk.allocated);
    assert!(s.network.is_some(), "the machine has a network device");

    // What QEMU booted from (the kernel, mapped whole, and the initrd) is paged out of it
    // once the guest is up: a machine never resets, so QEMU never reads them again.
    let qemu = host
        .processes
        .iter()
        .find(|p| p.name.starts_with("qemu"))
        .unwrap();
    let boot_files = || -> (usize, u64) {
        let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", qemu.pid)).unwrap();
        let (mut mappings, mut rss_kib, mut boot) = (0, 0, false);
        for line in smaps.lines() {
            // A mapping's line starts with its range; its fields' lines with "Name:".
            if line.split(' ').next().is_some_and(|r| r.contains('-')) {
                boot = line.ends_with(".vmlinux") || line.ends_with("/initrd.img");
                mappings += usize::from(boot);
            } else if boot && let Some(kib) = line.strip_prefix("Rss:") {
                rss_kib += kib.trim().trim_end_matches(" kB").parse::<u64>().unwrap();
            }
        }
        (mappings, rss_kib)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mappings, rss_kib) = loop {
        let (mappings, rss_kib) = boot_files();
        if rss_kib < 1024 || Instant::now() > deadline {
            break (mappings, rss_kib);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(mappings > 0, "QEMU maps the files it boots from");
    assert!(
        rss_kib < 1024,
        "QEMU still holds {rss_kib} KiB of the kernel and initrd it booted from"
    );

    // 200 MiB written into a tmpfs: the guest's cache and the host's memory grow by it.
    alice.cli_ok(
        &service,
        &[
            "machine",
            "run",
            "--root",
            "mkdir -p /tmp/fill && mount -t tmpfs tmpfs /tmp/fill",
            "&& dd if=/dev/zero of=/tmp/fill/x bs=1M count=200 2>/dev/null",
        ],
    );
    let filled = one(&alice, &service);
    let filled_guest = filled.guest_memory.unwrap();
    assert!(
        filled_guest.cache >= 180 * MIB,
        "the guest counts the tmpfs as cache: {guest:?} then {filled_guest:?}"
    );
    let filled_host = filled.host_memory.unwrap();
    assert!(
        filled_host.rss >= host.rss + 150 * MIB,
        "the host holds the pages the guest touched: {} then {}",
        host.rss,
        filled_host.rss
    );

    // Freed in the guest: given back to the host by free-page reporting.
    alice.cli_ok(
        &service,
        &[
            "machine",
            "run",
            "--root",
            "rm /tmp/fill/x && umount /tmp/fill",
        ],
    );
    let freed = until(&alice, &service, Duration::from_secs(30), |s| {
        s.host_memory
            .as_ref()
            .is_some_and(|h| h.rss + 100 * MIB <= filled_host.rss)
    });
    let freed_host = freed.host_memory.unwrap();
    assert!(
        freed_host.rss + 100 * MIB <= filled_host.rss,
        "freed guest memory goes back to the host: {} then {}",
        filled_host.rss,
        freed_host.rss
    );
    assert!(freed.guest_memory.unwrap().cache + 150 * MIB <= filled_guest.cache);

    // `inspect` carries the same figures.
    let inspect: serde_json::Value =
        serde_json::from_str(&alice.cli_ok(&service, &["machine", "inspect", "dev"])).unwrap();
    assert!(
        inspect[0]["stats"]["hostMemory"]["pss"].as_u64().unwrap() > 0,
        "{inspect}"
    );

    // The stream: one JSON array per sample, until interrupted.
    let mut stream = alice
        .command(
            &service,
            &alice.home,
            &["machine", "stats", "--format", "json"],
        )
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(stream.stdout.take().unwrap()).lines();
    for _ in 0..2 {
        let line = lines.next().expect("a sample").unwrap();
        let s: Vec<MachineStats> = serde_json::from_str(&line).unwrap();
        assert_eq!(s.len(), 1, "{line}");
    }
    stream.kill().unwrap();
    stream.wait().unwrap();

    // The table: a header and a row, the row saying what it is.
    let table = alice.cli_ok(&service, &["machine", "stats", "--no-stream"]);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.lines().nth(1).unwrap().starts_with("dev "), "{table}");

    // A file read into the page cache: once the machine has idled, the cache goes back to
    // the host (the tmpfs above did not: it is memory in use, not a cache).
    alice.cli_ok(
        &service,
        &[
            "machine",
            "run",
            "--root",
            "dd if=/dev/zero of=/big bs=1M count=150 2>/dev/null && sync && cat /big >/dev/null",
        ],
    );
    let cached = one(&alice, &service);
    let cached_guest = cached.guest_memory.unwrap();
    assert!(cached_guest.cache >= 140 * MIB, "{cached_guest:?}");
    let reclaimed = until(&alice, &service, Duration::from_secs(90), |s| {
        s.guest_memory
            .is_some_and(|g| g.cache + 100 * MIB <= cached_guest.cache)
    });
    let reclaimed_guest = reclaimed.guest_memory.unwrap();
    assert!(
        reclaimed_guest.cache + 100 * MIB <= cached_guest.cache,
        "an idle machine drops its page cache: {cached_guest:?} then {reclaimed_guest:?}"
    );
    assert!(
        service
            .log()
            .contains("idle: its page cache goes back to the host"),
        "the service says why"
    );
    let cached_rss = cached.host_memory.unwrap().rss;
    let reclaimed = until(&alice, &service, Duration::from_secs(30), |s| {
        s.host_memory
            .as_ref()
            .is_some_and(|h| h.rss + 80 * MIB <= cached_rss)
    });
    assert!(
        reclaimed.host_memory.as_ref().unwrap().rss + 80 * MIB <= cached_rss,
        "and the host gets the pages back: {cached_rss} then {:?}",
        reclaimed.host_memory
    );

    // Another user sees neither the machine nor its figures.
    assert!(sample(&bob, &service, &["--all"]).is_empty());
    let out = bob.cli(&service, &["machine", "stats", "--no-stream", "dev"]);
    assert_eq!(out.status.code(), Some(3), "not found for another user");

    // Stopped: listed only when asked for, with its disk and no VM figures.
    alice.cli_ok(&service, &["machine", "stop", "dev"]);
    assert!(
        sample(&alice, &service, &[]).is_empty(),
        "only running by default"
    );
    let stopped = one(&alice, &service);
    assert_eq!(stopped.status.to_string(), "stopped");
    assert!(stopped.host_memory.is_none() && stopped.guest_memory.is_none());
    assert!(stopped.disk.allocated > 0);
    assert_eq!(sample(&alice, &service, &["--all"]).len(), 1);
}
