//! A service killed (SIGKILL) in the middle of an operation, then restarted: every machine
//! ends absent or in a true, usable state, never `running` and dead. The deterministic case
//! first (killed right after QEMU starts, before the agent's readiness report), then a VM
//! whose report never comes (forced off, with the reason shown).

use std::process::Stdio;
use std::time::{Duration, Instant};

use container_e2e::{Registry, Service, is_root, kernel_config, require, tail, test_image};

fn config(boot_timeout: u64) -> String {
    format!(
        "[machine]\ncpus = 1\nmemory = \"512M\"\n[runtime]\nboot-timeout = {boot_timeout}\n{}",
        kernel_config()
    )
}

/// The machine as `inspect` shows it.
fn inspect(service: &Service, name: &str) -> serde_json::Value {
    let out = service.cli_ok(&["machine", "inspect", name]);
    let list: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    list.into_iter().next().unwrap()
}

/// Starts `machine start NAME` in the background and kills the service as soon as the
/// machine's QEMU is recorded (`run.json`), before the guest could report ready.
fn kill_service_right_after_qemu_starts(service: &Service, name: &str) -> serde_json::Value {
    let run_file = service.root.join("machines").join(name).join("run.json");
    let mut start = service
        .command(&["machine", "start", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !run_file.exists() {
        assert!(Instant::now() < deadline, "QEMU never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    service.kill_service();
    let _ = start.wait();
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&run_file).unwrap()).unwrap();
    assert_eq!(
        run["ready"], false,
        "the kill came after the readiness report: {run}"
    );
    run
}

fn alive(pid: i64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

/// Waits until the machine is neither starting nor stopping, at most `limit`; the machine
/// then.
fn settled(service: &Service, name: &str, limit: Duration) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    loop {
        let m = inspect(service, name);
        if m["status"] != "starting" && m["status"] != "stopping" {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "still starting after {limit:?}:\n{}",
            tail(&service.log(), 30)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_service_killed_before_the_readiness_report_leaves_a_machine_that_finishes_its_boot() {
    if !require(is_root(), "the service runs as root") {
        return;
    }
    let registry = Registry::start();
    let image = registry.push(&test_image("busybox"), "tests/busybox:1");
    let service = Service::start(&config(180));
    service.cli_ok(&["machine", "create", &image, "--name", "m", "--no-boot"]);

    kill_service_right_after_qemu_starts(&service, "m");
    // The guest boots on with no service: its agent's report finds nobody and is repeated.
    std::thread::sleep(Duration::from_secs(5));
    let restarted = Instant::now();
    service.launch();

    // Never `running` and dead: whenever `ls` says running, a command runs.
    let m = settled(&service, "m", Duration::from_secs(180));
    assert_eq!(m["status"], "running", "{m}\n{}", tail(&service.log(), 30));
    let out = service.cli_ok(&["machine", "run", "--root", "-n", "m", "echo", "usable"]);
    assert_eq!(out.trim(), "usable");
    eprintln!(
        "restart to a usable adopted machine: {:.1} s",
        restarted.elapsed().as_secs_f64()
    );
    assert!(
        service
            .log()
            .contains("the adopted machine finished its boot"),
        "{}",
        tail(&service.log(), 30)
    );
    // And it stops and starts as any machine.
    service.cli_ok(&["machine", "stop", "m"]);
    service.cli_ok(&["machine", "run", "-n", "m", "true"]);
    service.cli_ok(&["machine", "rm", "-f", "m"]);
}

#[test]
fn an_adopted_machine_that_never_reports_ready_is_forced_off_with_the_reason() {
    if !require(is_root(), "the service runs as root") {
        return;
    }
    let registry = Registry::start();
    let image = registry.push(&test_image("busybox"), "tests/busybox:1");
    // The shortest boot timeout: the adopted VM gets at least 15 s from the restart.
    let service = Service::start(&config(10));
    service.cli_ok(&["machine", "create", &image, "--name", "mute", "--no-boot"]);

    let run = kill_service_right_after_qemu_starts(&service, "mute");
    // The VM's vsock device freezes: no report can come out of the guest.
    let helpers: Vec<i64> = run["helpers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h[0].as_i64().unwrap())
        .collect();
    let qemu = run["qemu"][0].as_i64().unwrap();
    for pid in &helpers {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid as i32),
            nix::sys::signal::Signal::SIGSTOP,
        )
        .unwrap();
    }
    service.launch();
    assert_eq!(inspect(&service, "mute")["status"], "starting");

    let m = settled(&service, "mute", Duration::from_secs(60));
    assert_eq!(m["status"], "stopped", "{m}");
    let reason = m["stopReason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("did not report ready"),
        "inspect says why: {m}"
    );
    assert!(service.log().contains("did not report ready"));
    assert!(!alive(qemu), "QEMU lives on");
    for pid in helpers {
        assert!(!alive(pid), "helper {pid} lives on");
    }
    assert!(!service.root.join("machines/mute/run.json").exists());

    // The next start clears the reason and works.
    service.cli_ok(&["machine", "run", "--root", "-n", "mute", "true"]);
    assert!(inspect(&service, "mute").get("stopReason").is_none());
}

/// Runs `machine ls` `n` times; the mean time of one.
fn ls_time(service: &Service, n: u32) -> Duration {
    let t = Instant::now();
    for _ in 0..n {
        service.cli_ok(&["machine", "ls"]);
    }
    t.elapsed() / n
}

#[test]
fn a_machine_whose_agent_stops_answering_is_unresponsive_and_run_says_what_to_do() {
    if !require(is_root(), "the service runs as root") {
        return;
    }
    let registry = Registry::start();
    let image = registry.push(&test_image("busybox"), "tests/busybox:1");
    let service = Service::start(&config(180));
    for name in ["a", "b", "hung"] {
        service.cli_ok(&["machine", "create", &image, "--name", name]);
    }
    let healthy = ls_time(&service, 10);

    // The VM's vsock device freezes: its agent can no longer be reached.
    let run: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(service.root.join("machines/hung/run.json")).unwrap(),
    )
    .unwrap();
    for h in run["helpers"].as_array().unwrap() {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(h[0].as_i64().unwrap() as i32),
            nix::sys::signal::Signal::SIGSTOP,
        )
        .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while inspect(&service, "hung")["status"] != "unresponsive" {
        assert!(
            Instant::now() < deadline,
            "never unresponsive: {}",
            inspect(&service, "hung")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let ls = service.cli_ok(&["machine", "ls"]);
    assert!(ls.contains("unresponsive"), "{ls}");
    let with_one_hung = ls_time(&service, 10);
    eprintln!(
        "machine ls with 3 machines: {:.0} ms, with one of them unresponsive: {:.0} ms",
        healthy.as_secs_f64() * 1000.0,
        with_one_hung.as_secs_f64() * 1000.0
    );
    assert!(
        with_one_hung < healthy + Duration::from_millis(500),
        "an unresponsive machine slows ls down"
    );

    // `run` says what is wrong and what to do, at once, with the conflict exit code.
    let started = Instant::now();
    let out = service.cli(&["machine", "run", "--root", "-n", "hung", "true"]);
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unresponsive") && err.contains("container machine stop -f hung"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // The others are untouched.
    service.cli_ok(&["machine", "run", "--root", "-n", "a", "true"]);

    // What it says works.
    service.cli_ok(&["machine", "stop", "-f", "hung"]);
    assert_eq!(inspect(&service, "hung")["status"], "stopped");
    let out = service.cli_ok(&["machine", "run", "--root", "-n", "hung", "echo", "back"]);
    assert_eq!(out.trim(), "back");
    assert_eq!(inspect(&service, "hung")["status"], "running");
}
