//! Unit tests of the network logic against the recording fake host.

use std::net::Ipv4Addr;
use std::sync::Arc;

use super::fake::FakeHost;
use super::*;

struct Fixture {
    dir: tempfile::TempDir,
    host: Arc<FakeHost>,
}

fn config(subnet: &str) -> NetworkConfig {
    NetworkConfig {
        subnet: subnet.into(),
        bridge: "container0".into(),
        forward_address: std::net::Ipv4Addr::LOCALHOST.into(),
    }
}

impl Fixture {
    fn new() -> Self {
        let host = Arc::new(FakeHost::default());
        host.add_link("uplink", Some("veth"));
        {
            let mut s = host.state();
            s.addresses
                .insert("uplink".into(), vec![(Ipv4Addr::new(10, 0, 0, 2), 24)]);
            s.static_routes.push(RouteInfo {
                destination: Ipv4Addr::UNSPECIFIED,
                prefix: 0,
                device: Some("uplink".into()),
            });
        }
        Self {
            dir: tempfile::tempdir().unwrap(),
            host,
        }
    }

    fn open(&self, subnet: &str) -> Result<Network, NetworkError> {
        let none = self.dir.path().join("no-resolv.conf");
        Network::open(self.dir.path(), &config(subnet), self.host.clone())
            .map(|n| n.with_resolv_conf(none))
    }

    fn network(&self) -> Network {
        self.open("192.168.64.0/24").unwrap()
    }
}

#[test]
fn open_rejects_invalid_configuration() {
    let f = Fixture::new();
    for bad in [
        "192.168.64.0/31",
        "fd00::/64",
        "192.168.64.0",
        "192.168.64.9/24",
    ] {
        let e = f.open(bad).unwrap_err();
        assert!(matches!(e, NetworkError::InvalidSubnet(_)), "{bad}: {e}");
        assert!(e.to_string().contains("[network]"));
    }
    let mut c = config("192.168.64.0/24");
    c.bridge = "bad name".into();
    let e = Network::open(f.dir.path(), &c, f.host.clone()).unwrap_err();
    assert!(matches!(e, NetworkError::InvalidBridgeName(_)));
    assert!(
        f.host.state().calls.is_empty(),
        "open touches nothing on the host"
    );
}

#[test]
fn leases_are_sticky_across_reopen_and_released_at_rm() {
    let f = Fixture::new();
    let net = f.network();
    let a = net.lease("a").unwrap();
    let b = net.lease("b").unwrap();
    assert_ne!(a.ip, b.ip);
    assert_eq!(a.ip, Ipv4Addr::new(192, 168, 64, 2));
    assert_eq!(a.mac, "52:54:00:a8:40:02");
    assert_eq!(a.gateway, Ipv4Addr::new(192, 168, 64, 1));
    assert_eq!(a.cidr(), "192.168.64.2/24");
    drop(net);

    let net = f.network();
    assert_eq!(net.lease_of("a"), Some(a.clone()));
    assert_eq!(net.lease("b").unwrap(), b);
    assert_eq!(net.release("a").unwrap(), Some(a));
    assert_eq!(net.release("a").unwrap(), None);
    drop(net);

    let net = f.network();
    assert_eq!(net.lease_of("a"), None);
    assert_eq!(net.leased(), ["b"]);
}

#[test]
fn the_hosts_file_follows_leases_and_a_reopened_network() {
    let f = Fixture::new();
    let hosts = f.dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
    let named = |net: Network| {
        net.with_names(
            "machine",
            Box::new(host_names::HostsFile {
                path: hosts.clone(),
                domain: "machine".into(),
            }),
        )
    };
    let block = |lines: &str| {
        format!(
            "127.0.0.1 localhost\n{}\n{lines}{}\n",
            host_names::BEGIN,
            host_names::END
        )
    };
    let net = named(f.network());
    assert_eq!(net.dns_name("dev").as_deref(), Some("dev.machine"));
    net.lease_owned("dev", 1000).unwrap();
    net.lease_owned("db", 1000).unwrap();
    let text = std::fs::read_to_string(&hosts).unwrap();
    assert_eq!(
        text,
        block("192.168.64.3\tdb.machine\n192.168.64.2\tdev.machine\n")
    );
    // A rename (the core releases the old name and leases the new one).
    net.release("dev").unwrap();
    net.lease_owned("web", 1000).unwrap();
    assert_eq!(
        std::fs::read_to_string(&hosts).unwrap(),
        block("192.168.64.3\tdb.machine\n192.168.64.2\tweb.machine\n")
    );
    drop(net);
    // A service started again writes what its leases say, whatever the file holds.
    std::fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
    let net = named(f.network());
    assert!(
        std::fs::read_to_string(&hosts)
            .unwrap()
            .contains("web.machine")
    );
    net.release("web").unwrap();
    net.release("db").unwrap();
    assert_eq!(
        std::fs::read_to_string(&hosts).unwrap(),
        "127.0.0.1 localhost\n"
    );
}

#[test]
fn a_changed_subnet_drops_old_leases_and_persists_that() {
    let f = Fixture::new();
    f.network().lease("a").unwrap();
    let net = f.open("172.30.0.0/24").unwrap();
    assert_eq!(net.lease_of("a"), None);
    assert_eq!(net.lease("a").unwrap().ip, Ipv4Addr::new(172, 30, 0, 2));
}

#[test]
fn exhaustion_names_the_machine_and_changes_nothing() {
    let f = Fixture::new();
    let net = f.open("10.9.0.0/30").unwrap();
    net.lease("only").unwrap();
    let before = std::fs::read(f.dir.path().join("network/leases.json")).unwrap();
    let e = net.lease("second").unwrap_err();
    assert!(matches!(e, NetworkError::Exhausted { .. }));
    assert!(e.to_string().contains("`second`"), "{e}");
    assert_eq!(
        std::fs::read(f.dir.path().join("network/leases.json")).unwrap(),
        before
    );
    assert_eq!(net.lease_of("second"), None);
}

#[tokio::test]
async fn attach_builds_bridge_nat_forwarding_and_detach_restores() {
    let f = Fixture::new();
    let net = f.network();
    net.lease("a").unwrap();
    let tap = net.attach("a").await.unwrap();
    assert_eq!(tap, tap_name("a"));
    assert!(tap.len() <= 15 && tap.starts_with(TAP_PREFIX));
    {
        let s = f.host.state();
        let br = &s.links["container0"];
        assert_eq!(br.kind.as_deref(), Some("bridge"));
        assert!(br.up);
        assert_eq!(
            s.addresses["container0"],
            [(Ipv4Addr::new(192, 168, 64, 1), 24)]
        );
        assert_eq!(s.links[&tap].controller.as_deref(), Some("container0"));
        assert!(s.links[&tap].up);
        assert_eq!(s.nat.as_ref().unwrap().subnet, net.subnet());
        assert!(s.ip_forward);
    }
    let tap_b = net.attach("b").await.unwrap();
    assert_ne!(tap, tap_b);
    net.detach("a").await.unwrap();
    assert!(f.host.state().ip_forward, "b still runs");
    assert!(f.host.state().nat.is_some());
    net.detach("b").await.unwrap();
    net.detach("b").await.unwrap();
    let s = f.host.state();
    assert!(!s.ip_forward, "forwarding restored to off");
    assert!(s.nat.is_none());
    assert!(s.links.contains_key("container0"), "the bridge may stay");
    assert_eq!(
        s.addresses["container0"].len(),
        1,
        "the gateway address is added once"
    );
}

#[tokio::test]
async fn forwarding_already_on_is_left_on() {
    let f = Fixture::new();
    f.host.state().ip_forward = true;
    let net = f.network();
    net.attach("a").await.unwrap();
    net.detach("a").await.unwrap();
    let s = f.host.state();
    assert!(s.ip_forward);
    assert!(!s.calls.iter().any(|c| c.starts_with("set_ip_forward")));
}

#[tokio::test]
async fn overlapping_subnet_is_refused_before_any_change() {
    let f = Fixture::new();
    let net = f.open("10.0.0.0/16").unwrap();
    let e = net.attach("a").await.unwrap_err();
    assert!(matches!(e, NetworkError::Overlap { .. }), "{e}");
    assert!(e.to_string().contains("10.0.0.0/24 (device uplink)"), "{e}");
    let s = f.host.state();
    assert!(s.calls.is_empty(), "{:?}", s.calls);
}

#[tokio::test]
async fn bridge_name_taken_by_another_kind_is_refused() {
    let f = Fixture::new();
    f.host.add_link("container0", Some("veth"));
    let e = f.network().attach("a").await.unwrap_err();
    assert!(
        matches!(&e, NetworkError::BridgeNameTaken { kind, .. } if kind == "veth"),
        "{e}"
    );
    assert!(f.host.state().calls.is_empty());
}

#[tokio::test]
async fn a_bridge_that_cannot_get_its_address_is_removed() {
    let f = Fixture::new();
    f.host.state().failing.insert("add_ipv4_address");
    let e = f.network().attach("a").await.unwrap_err();
    assert!(matches!(e, NetworkError::Host(_)));
    let s = f.host.state();
    assert!(!s.links.contains_key("container0"));
    assert!(s.nat.is_none() && !s.ip_forward);
}

#[tokio::test]
async fn a_failed_attach_leaves_no_tap_nat_or_forwarding() {
    for op in [
        "create_tap",
        "set_controller",
        "set_up",
        "set_nat",
        "set_ip_forward",
    ] {
        let f = Fixture::new();
        let net = f.network();
        net.attach("bystander-check").await.unwrap();
        net.detach("bystander-check").await.unwrap();
        f.host.state().failing.insert(op);
        let e = net.attach("a").await.unwrap_err();
        assert!(matches!(e, NetworkError::Host(_)), "{op}: {e}");
        f.host.state().failing.clear();
        assert!(f.host.taps().is_empty(), "{op}: tap left behind");
        let s = f.host.state();
        assert!(s.nat.is_none(), "{op}: NAT left behind");
        assert!(!s.ip_forward, "{op}: forwarding left on");
        drop(s);
        assert_eq!(net.book().saved_ip_forward, None, "{op}");
    }
}

#[tokio::test]
async fn a_failed_attach_keeps_what_other_machines_need() {
    let f = Fixture::new();
    let net = f.network();
    net.attach("other").await.unwrap();
    f.host.state().failing.insert("set_controller");
    net.attach("a").await.unwrap_err();
    f.host.state().failing.clear();
    assert_eq!(f.host.taps(), [tap_name("other")]);
    let s = f.host.state();
    assert!(s.nat.is_some() && s.ip_forward);
}

#[tokio::test]
async fn reconcile_frees_dead_leases_and_stale_taps() {
    let f = Fixture::new();
    let net = f.network();
    for m in ["keep", "stopped", "deleted"] {
        net.lease(m).unwrap();
    }
    net.attach("keep").await.unwrap();
    net.attach("stopped").await.unwrap();
    f.host.add_link("ctap-0123456789", Some("tun"));
    f.host.add_link("eth-not-ours", Some("tun"));
    drop(net);

    let net = f.network();
    let known = ["keep".to_string(), "stopped".to_string()];
    let r = net.reconcile(&known, &known[..1]).await.unwrap();
    assert_eq!(r.released, ["deleted"]);
    let mut removed = r.removed_taps.clone();
    removed.sort();
    let mut expected = vec!["ctap-0123456789".to_string(), tap_name("stopped")];
    expected.sort();
    assert_eq!(removed, expected);
    assert_eq!(f.host.taps(), [tap_name("keep")]);
    assert!(f.host.state().links.contains_key("eth-not-ours"));
    assert!(f.host.state().ip_forward && f.host.state().nat.is_some());

    drop(net);
    let net = f.network();
    assert_eq!(net.lease_of("deleted"), None);
    let r = net.reconcile(&known, &[]).await.unwrap();
    assert_eq!(r.removed_taps, [tap_name("keep")]);
    let s = f.host.state();
    assert!(
        !s.ip_forward,
        "the value saved before the restart is restored"
    );
    assert!(s.nat.is_none());
}

#[tokio::test]
async fn reconcile_rebridges_a_running_tap_that_lost_its_bridge() {
    let f = Fixture::new();
    let net = f.network();
    net.attach("a").await.unwrap();
    f.host.delete_link("container0").await.unwrap();
    net.reconcile(&["a".into()], &["a".into()]).await.unwrap();
    let s = f.host.state();
    assert_eq!(
        s.links[&tap_name("a")].controller.as_deref(),
        Some("container0")
    );
    assert_eq!(
        s.addresses["container0"],
        [(Ipv4Addr::new(192, 168, 64, 1), 24)]
    );
}

#[test]
fn guest_config_names_the_gateway_as_the_one_nameserver() {
    let f = Fixture::new();
    let resolv = f.dir.path().join("resolv.conf");
    std::fs::write(&resolv, "nameserver 127.0.0.53\nnameserver 10.255.255.53\n").unwrap();
    let net = f.network().with_resolv_conf(resolv.clone());
    assert!(matches!(
        net.guest_config("a"),
        Err(NetworkError::NotLeased(_))
    ));
    net.lease("a").unwrap();
    let c = net.guest_config("a").unwrap();
    assert_eq!(c.interface, "eth0");
    assert_eq!(c.address_cidr, "192.168.64.2/24");
    assert_eq!(c.gateway, "192.168.64.1");
    // The host's resolvers are reached through the gateway's relay, not by the guest.
    assert_eq!(c.nameservers, ["192.168.64.1"]);
}

#[tokio::test]
async fn many_cycles_leak_nothing() {
    let f = Fixture::new();
    let net = f.network();
    for i in 0..200 {
        let name = format!("m{}", i % 7);
        let lease = net.lease(&name).unwrap();
        assert!(net.subnet().is_machine_address(lease.ip));
        net.attach(&name).await.unwrap();
        net.detach(&name).await.unwrap();
        net.release(&name).unwrap();
    }
    assert!(net.leased().is_empty());
    assert!(f.host.taps().is_empty());
    let s = f.host.state();
    assert!(s.nat.is_none() && !s.ip_forward);
}

#[test]
fn tap_names_fit_linux_and_differ_per_machine() {
    let a = tap_name("a");
    assert_eq!(a.len(), 15);
    assert_eq!(a, tap_name("a"));
    assert_ne!(a, tap_name("b"));
}

#[test]
fn host_operations_can_run_on_any_runtime_thread() {
    fn send<T: Send>(_: T) {}
    let f = Fixture::new();
    let net = f.network();
    send(net.ensure_bridge());
    send(net.attach("a"));
    send(net.detach("a"));
    send(net.reconcile(&[], &[]));
}
