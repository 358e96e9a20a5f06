//! The service's own boundary: a second instance on the same data directory changes nothing
//! of the first one's work in flight, and a guest flooding its console neither fills the disk
//! nor the service's memory, and `logs -n` stays instant.

use std::process::Stdio;
use std::time::{Duration, Instant};

use container_e2e::{
    Registry, Service, Throttle, in_netns, install_bin, is_root, kernel_config, require, test_image,
};

/// The service's resident memory in KiB, from its pid in `system status`.
fn service_rss_kib(service: &Service) -> u64 {
    let status: serde_json::Value =
        serde_json::from_str(&service.cli_ok(&["system", "status", "--format", "json"])).unwrap();
    let pid = status["pid"].as_u64().expect("status names the pid");
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

#[test]
fn a_second_service_on_the_same_root_exits_and_changes_nothing() {
    if !require(is_root(), "the service runs as root") {
        return;
    }
    let layout = test_image("debian");
    let registry = Registry::start();
    let direct = registry.push(&layout, "tests/debian:1");
    // 4 MiB/s: the pull is still downloading when the second service starts.
    let throttle = Throttle::start(&registry.addr, 4 << 20);
    let reference = direct.replacen(&registry.addr, &throttle.addr, 1);
    let service = Service::start("");
    let pull = service
        .command(&["image", "pull", "-q", &reference])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ingest = service.root.join("images/ingest");
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::read_dir(&ingest).map_or(0, |d| d.count()) == 0 {
        assert!(Instant::now() < deadline, "the pull never started writing");
        std::thread::sleep(Duration::from_millis(50));
    }

    // A second instance on the same root, with a socket of its own.
    let other = service.dir.path().join("other.sock");
    let started = Instant::now();
    let second = in_netns(install_bin("container-apiserver"))
        .arg("--root")
        .arg(&service.root)
        .arg("--run-dir")
        .arg(service.dir.path().join("other-run"))
        .arg("--socket")
        .arg(&other)
        .arg("--config")
        .arg(&service.config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "a second service ran: {stderr}");
    assert!(
        stderr.contains("another container service is already running"),
        "{stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "it refused at once"
    );
    assert!(!other.exists(), "it listened on nothing");
    assert!(
        std::fs::read_dir(&ingest).map_or(0, |d| d.count()) > 0,
        "the first service's downloads in flight are still there"
    );

    // The first service's pull completes untouched, and the service goes on working.
    throttle.set_rate(0);
    let out = pull.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the pull in flight failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    service.cli_ok(&["image", "inspect", &reference]);
    service.cli_ok(&[
        "machine",
        "create",
        &reference,
        "--name",
        "after",
        "--no-boot",
    ]);
}

#[test]
fn a_guest_flooding_its_console_leaves_logs_instant_and_the_service_small() {
    if !require(is_root(), "the service runs as root") {
        return;
    }
    let registry = Registry::start();
    let image = registry.push(&test_image("busybox"), "tests/busybox:1");
    let config = format!(
        "[machine]\ncpus = 1\nmemory = \"512M\"\nhome-mount = \"none\"\n{}",
        kernel_config()
    );
    let service = Service::start(&config);
    service.cli_ok(&["machine", "create", &image, "--name", "loud"]);
    let rss_before = service_rss_kib(&service);
    service.cli_ok(&[
        "machine",
        "run",
        "-n",
        "loud",
        "--root",
        "-d",
        "while :; do echo 'flood flood flood flood flood flood flood flood flood flood'; done > /dev/console",
    ]);
    let console = service.root.join("machines/loud/console.log");
    let cap = 8 << 20;
    let mut grew_past_cap_once = false;
    let until = Instant::now() + Duration::from_secs(60);
    while Instant::now() < until {
        std::thread::sleep(Duration::from_secs(5));
        let len = std::fs::metadata(&console).map_or(0, |m| m.len());
        // Checked every second: at most a second's flood over the cap.
        assert!(len < 2 * cap, "console.log is {len} bytes");
        grew_past_cap_once |= len > cap / 2;
        let asked = Instant::now();
        let tail = service.cli_ok(&["machine", "logs", "-n", "10", "loud"]);
        assert!(
            asked.elapsed() < Duration::from_secs(3),
            "logs -n 10 took {:?}",
            asked.elapsed()
        );
        assert_eq!(tail.lines().count(), 10, "{tail}");
    }
    assert!(
        grew_past_cap_once,
        "the flood never reached the cap: the test proved nothing"
    );
    let rss_after = service_rss_kib(&service);
    assert!(
        rss_after < rss_before + 64 * 1024,
        "the service grew from {rss_before} KiB to {rss_after} KiB"
    );
    let logs_all = service
        .command(&["machine", "logs", "loud"])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(logs_all.success(), "the whole (capped) log streams");
    service.cli_ok(&["machine", "rm", "-f", "loud"]);
}
