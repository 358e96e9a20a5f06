//! `machine commit` and `image push` end to end on busybox: alice commits a machine with a
//! file of hers, pushes the image to a real registry and removes it; bob pulls it into his
//! own namespace and makes a machine of it, which has the file and is set up for bob (his
//! account, `whoami`); alice's machine is untouched. Nobody can commit another user's
//! machine (it is not found), and a commit replaces only the committer's own name.

use std::time::Instant;

use container_e2e::{Registry, Service, TestUser, is_root, kernel_config, require, test_image};

fn config() -> String {
    format!(
        "[machine]\ncpus = 1\nmemory = \"512M\"\n{}",
        kernel_config()
    )
}

fn sh(user: &TestUser, service: &Service, machine: &str, line: &str) -> String {
    user.cli_ok(
        service,
        &[
            "machine",
            "run",
            "-n",
            machine,
            "--no-shell",
            "sh",
            "-c",
            line,
        ],
    )
}

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

#[test]
fn a_committed_machine_travels_through_a_registry_to_another_user() {
    if !require(is_root(), "the service runs as root") {
        return;
    }
    let registry = Registry::start();
    let base = registry.push(&test_image("busybox"), "tests/busybox:1");
    let host = registry.addr.clone();
    let committed = format!("{host}/alice/committed:1");
    let service = Service::start(&config());
    let alice = TestUser::ensure("ctalice", 1500);
    let bob = TestUser::ensure("ctbob", 1501);

    alice.cli_ok(&service, &["machine", "create", &base, "--name", "m"]);
    root_sh(
        &alice,
        &service,
        "m",
        "mkdir -p /opt && echo from-alice > /opt/committed && echo scratch > /tmp/scratch",
    );

    // Bob cannot commit alice's machine: to him it does not exist.
    let out = bob.cli(
        &service,
        &["machine", "commit", "m", &format!("{host}/bob/x:1")],
    );
    assert_eq!(out.status.code(), Some(3), "{out:?}");

    let started = Instant::now();
    let json = alice.cli_ok(
        &service,
        &["machine", "commit", "m", &committed, "--format", "json"],
    );
    eprintln!("commit took {:?}", started.elapsed());
    let summary: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(summary["reference"], committed.as_str());
    let inspect = alice.cli_ok(&service, &["image", "inspect", &committed]);
    let inspect: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    let detail = if inspect.is_array() {
        &inspect[0]
    } else {
        &inspect
    };
    let labels = &detail["config"]["Labels"];
    assert_eq!(labels["org.container.machine.source"], "m", "{detail}");
    assert!(
        labels["org.container.machine.base"]
            .as_str()
            .unwrap()
            .starts_with("sha256:"),
        "{detail}"
    );
    assert_eq!(detail["layers"].as_array().unwrap().len(), 1, "{detail}");
    assert_eq!(
        detail["hasInit"].as_bool().or(detail["has_init"].as_bool()),
        Some(true),
        "{detail}"
    );

    let started = Instant::now();
    let pushed = alice.cli_ok(&service, &["image", "push", &committed, "-q"]);
    assert_eq!(pushed.trim(), "");
    eprintln!("push took {:?}", started.elapsed());
    // A second push sends nothing again and still succeeds.
    assert_eq!(
        alice
            .cli_ok(&service, &["image", "push", &committed])
            .trim(),
        committed
    );
    alice.cli_ok(&service, &["image", "rm", &committed]);

    // Bob's namespace is his own: he pulls it, and his machine is set up for him.
    bob.cli_ok(&service, &["image", "pull", &committed, "-q"]);
    bob.cli_ok(&service, &["machine", "create", &committed, "--name", "b"]);
    assert_eq!(
        sh(&bob, &service, "b", "cat /opt/committed").trim(),
        "from-alice"
    );
    assert_eq!(sh(&bob, &service, "b", "whoami").trim(), bob.name);
    assert!(sh(&bob, &service, "b", "grep ^ctbob: /etc/passwd").contains(":1501:"));
    assert_eq!(sh(&bob, &service, "b", "ls /tmp").trim(), "");

    // Alice's machine is untouched and still hers.
    assert_eq!(
        sh(&alice, &service, "m", "cat /opt/committed").trim(),
        "from-alice"
    );
    assert_eq!(sh(&alice, &service, "m", "whoami").trim(), alice.name);

    // A commit to a name bob also holds replaces only alice's.
    let shared = format!("{host}/shared/name:1");
    bob.cli_ok(&service, &["image", "tag", &committed, &shared]);
    let bob_digest = bob.cli_ok(&service, &["image", "inspect", &shared]);
    root_sh(&alice, &service, "m", "echo second > /opt/second");
    alice.cli_ok(&service, &["machine", "commit", "m", &shared, "-q"]);
    assert_eq!(
        bob.cli_ok(&service, &["image", "inspect", &shared]),
        bob_digest
    );
    // Committing again under the same name replaces alice's own.
    let first = alice.cli_ok(&service, &["image", "inspect", &shared]);
    root_sh(&alice, &service, "m", "echo third > /opt/third");
    alice.cli_ok(&service, &["machine", "commit", "m", &shared, "-q"]);
    assert_ne!(
        alice.cli_ok(&service, &["image", "inspect", &shared]),
        first
    );
}
