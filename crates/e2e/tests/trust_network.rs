//! The machine network between owners, inside the test process's own network namespace:
//! machines of one user reach each other, machines of another user are out of reach, and a
//! guest (whose user has sudo) that takes another address or MAC can send nothing, while the
//! host side still reaches every machine.

use std::process::Output;

use container_e2e::{
    Registry, Service, TestUser, in_netns, is_root, kernel_config, require, test_image,
};

fn config() -> String {
    format!(
        "[machine]\ncpus = 1\nmemory = \"512M\"\nhome-mount = \"none\"\n{}",
        kernel_config()
    )
}

/// The address the service leased to `machine` (from its lease file, whatever the JSON
/// schema of `ls`).
fn ip_of(service: &Service, machine: &str) -> String {
    let text = std::fs::read_to_string(service.root.join("network/leases.json")).unwrap();
    let leases: serde_json::Value = serde_json::from_str(&text).unwrap();
    leases["leases"][machine]["ip"]
        .as_str()
        .unwrap_or_else(|| panic!("{machine} has no lease: {text}"))
        .to_string()
}

/// SCRIPT as root in `machine` (through the machine's shell), run by `user`.
fn as_root(user: &TestUser, service: &Service, machine: &str, script: &str) -> Output {
    user.command(
        service,
        &user.home,
        &["machine", "run", "-n", machine, "--root", script],
    )
    .output()
    .unwrap()
}

fn pings(user: &TestUser, service: &Service, machine: &str, ip: &str) -> bool {
    as_root(user, service, machine, &format!("ping -c 2 -W 2 {ip}"))
        .status
        .success()
}

#[test]
fn machines_of_other_owners_are_out_of_reach_and_a_guest_cannot_spoof() {
    if !require(is_root(), "the service runs as root") {
        return;
    }
    let registry = Registry::start();
    let image = registry.push(&test_image("busybox"), "tests/busybox:1");
    let service = Service::start(&config());
    let alice = TestUser::ensure("ctalice", 1500);
    let bob = TestUser::ensure("ctbob", 1501);
    alice.cli_ok(&service, &["machine", "create", &image, "--name", "a1"]);
    alice.cli_ok(&service, &["machine", "create", &image, "--name", "a2"]);
    bob.cli_ok(&service, &["machine", "create", &image, "--name", "b1"]);
    let (a2, b1) = (ip_of(&service, "a2"), ip_of(&service, "b1"));
    let gateway = {
        let mut octets: Vec<&str> = a2.split('.').collect();
        octets[3] = "1";
        octets.join(".")
    };

    // One owner's machines reach each other and the host; the host reaches every machine.
    assert!(pings(&alice, &service, "a1", &a2), "a1 -> a2 (same owner)");
    assert!(pings(&alice, &service, "a1", &gateway), "a1 -> the host");
    assert!(pings(&bob, &service, "b1", &gateway), "b1 -> the host");
    for ip in [&a2, &b1] {
        let out = in_netns("ping")
            .args(["-c", "1", "-W", "2", ip])
            .output()
            .unwrap();
        assert!(out.status.success(), "the host -> {ip}");
    }
    // Another owner's machine is out of reach, both ways.
    assert!(
        !pings(&alice, &service, "a1", &b1),
        "a1 -> b1 (bob's) must fail"
    );
    assert!(
        !pings(&bob, &service, "b1", &a2),
        "b1 -> a2 (alice's) must fail"
    );

    // A guest that takes another address sends nothing: not to the host, not to a machine
    // of its own owner, not as bob's machine.
    let spoof = |ip: &str| {
        format!(
            "ip addr flush dev eth0 && ip addr add {ip}/24 dev eth0 && \
             ping -c 2 -W 2 {gateway} || ping -c 2 -W 2 {a2}"
        )
    };
    let free = {
        let mut octets: Vec<&str> = a2.split('.').collect();
        octets[3] = "200";
        octets.join(".")
    };
    for ip in [&free, &b1] {
        let out = as_root(&alice, &service, "a1", &spoof(ip));
        assert!(
            !out.status.success(),
            "a1 sent as {ip}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // Nor does a guest that takes another MAC, even with its own address back.
    let a1_ip = ip_of(&service, "a1");
    let out = as_root(
        &alice,
        &service,
        "a1",
        &format!(
            "ip addr flush dev eth0 && ip addr add {a1_ip}/24 dev eth0 && \
             ip link set eth0 down && ip link set eth0 address 52:54:00:12:34:56 && \
             ip link set eth0 up && ping -c 2 -W 2 {gateway}"
        ),
    );
    assert!(
        !out.status.success(),
        "a1 sent from another MAC: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    for (user, name) in [(&alice, "a1"), (&alice, "a2"), (&bob, "b1")] {
        user.cli_ok(&service, &["machine", "rm", "-f", name]);
    }
}
