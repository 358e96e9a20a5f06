//! Autostart end to end: a machine made with `--autostart` boots when the service starts
//! (a service restart with the machine stopped stands in for a host reboot) and boots again
//! after its VM is killed; a machine without it stays stopped, and `machine stop` is never
//! undone.

use std::time::{Duration, Instant};

use container_e2e::{Registry, Service, TestUser, is_root, kernel_config, require, test_image};

fn status(user: &TestUser, service: &Service, name: &str) -> String {
    let ls = user.cli_ok(service, &["machine", "ls", "--format", "json"]);
    let ls: serde_json::Value = serde_json::from_str(&ls).unwrap();
    ls.as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == name)
        .map(|m| m["status"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

fn wait_for(user: &TestUser, service: &Service, name: &str, want: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    while status(user, service, name) != want {
        assert!(
            Instant::now() < deadline,
            "{name} never became {want}; service log:\n{}",
            container_e2e::tail(&service.log(), 40)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn autostart_after_a_service_restart_and_after_a_killed_vm_never_after_stop() {
    if !require(is_root(), "the service runs as root") {
        return;
    }
    let registry = Registry::start();
    let image = registry.push(&test_image("busybox"), "tests/busybox:1");
    let service = Service::start(&kernel_config());
    let alice = TestUser::ensure("ctalice", 1500);
    let a = |args: &[&str]| alice.cli_ok(&service, args);

    a(&["machine", "create", &image, "--name", "auto", "--autostart"]);
    a(&["machine", "create", &image, "--name", "plain"]);
    a(&["machine", "stop", "auto", "plain"]);
    let ls: serde_json::Value =
        serde_json::from_str(&a(&["machine", "ls", "--format", "json"])).unwrap();
    let flags: Vec<(String, bool)> = ls
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["id"].as_str().unwrap().into(), m["autostart"] == true))
        .collect();
    assert_eq!(flags, [("auto".into(), true), ("plain".into(), false)]);

    // The service starts (as after a host reboot): the autostart machine boots, alone.
    service.stop_service();
    service.launch();
    wait_for(
        &alice,
        &service,
        "auto",
        "running",
        Duration::from_secs(120),
    );
    assert_eq!(status(&alice, &service, "plain"), "stopped");

    // Its VM killed: it boots again.
    let run: serde_json::Value = serde_json::from_slice(
        &std::fs::read(service.root.join("machines/auto/run.json")).unwrap(),
    )
    .unwrap();
    let pid = run["qemu"][0].as_i64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_for(&alice, &service, "auto", "stopped", Duration::from_secs(30));
    wait_for(
        &alice,
        &service,
        "auto",
        "running",
        Duration::from_secs(120),
    );
    alice.cli_ok(&service, &["machine", "run", "-n", "auto", "true"]);

    // Stopped on purpose: it stays stopped.
    a(&["machine", "stop", "auto"]);
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(status(&alice, &service, "auto"), "stopped");

    // `set autostart=off`: the next service start leaves it alone.
    a(&["machine", "set", "-n", "auto", "autostart=off"]);
    service.stop_service();
    service.launch();
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(status(&alice, &service, "auto"), "stopped");
}
