//! `container system events` end to end: a create, stop and rm show up in order as JSON
//! lines on the owner's stream, and another user's stream shows none of them.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::Duration;

use container_e2e::{Registry, Service, TestUser, is_root, kernel_config, require, test_image};

/// `container system events --format json` as `user`, its stdout piped.
fn follow(user: &TestUser, service: &Service) -> Child {
    user.command(
        service,
        &user.home.clone(),
        &["system", "events", "--format", "json"],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .expect("run container system events")
}

/// The lines `child` printed, read on a thread, collected once it is killed.
fn lines_of(mut child: Child) -> (std::thread::JoinHandle<Vec<String>>, Child) {
    let out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        BufReader::new(out)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    (reader, child)
}

#[test]
fn events_of_a_machine_in_order_for_its_owner_only() {
    if !require(is_root(), "the service runs as root") {
        return;
    }
    let registry = Registry::start();
    let image = registry.push(&test_image("busybox"), "tests/busybox:1");
    let service = Service::start(&kernel_config());
    let alice = TestUser::ensure("ctalice", 1500);
    let bob = TestUser::ensure("ctbob", 1501);

    let (alice_lines, mut alice_events) = lines_of(follow(&alice, &service));
    let (bob_lines, mut bob_events) = lines_of(follow(&bob, &service));
    // Both streams are open before anything happens.
    std::thread::sleep(Duration::from_secs(2));

    alice.cli_ok(&service, &["machine", "create", &image, "--name", "ev"]);
    alice.cli_ok(&service, &["machine", "stop", "ev"]);
    alice.cli_ok(&service, &["machine", "rm", "ev"]);
    // Lines are flushed one at a time: give the last one a moment to arrive.
    std::thread::sleep(Duration::from_secs(2));
    for child in [&mut alice_events, &mut bob_events] {
        let _ = child.kill();
        let _ = child.wait();
    }
    let alice_lines = alice_lines.join().unwrap();
    let actions: Vec<String> = alice_lines
        .iter()
        .map(|l| {
            let e: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
            assert_eq!(e["machine"], "ev", "{l}");
            assert!(e["time"].is_string(), "{l}");
            e["action"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(
        actions,
        [
            "created", "booting", "running", "stopping", "stopped", "deleted"
        ],
        "{alice_lines:?}"
    );
    let bob_lines = bob_lines.join().unwrap();
    assert!(
        bob_lines.is_empty(),
        "bob saw alice's events: {bob_lines:?}"
    );
}
