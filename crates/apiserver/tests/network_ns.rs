//! The machine network against the real kernel: every test re-executes this binary under
//! `unshare --net`, so the bridge, taps, nftables table and `ip_forward` it touches belong to
//! a network namespace it created, and it refuses to run in one that is not fresh. Inside, a
//! veth "uplink" with an address and a default route stands in for the host's network.
//! Observations go through `ip`, `nft` and /proc, not through the code under test.

use std::future::Future;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use container_apiserver::config::NetworkConfig;
use container_apiserver::network::{Network, NetworkError, RealHost, tap_name};
use serde_json::Value;

const INSIDE: &str = "CONTAINER_NETWORK_TEST_IN_NETNS";
const BRIDGE: &str = "container0";
const SUBNET: &str = "192.168.64.0/24";

/// Runs `body` in a fresh network namespace (this test alone, re-executed under unshare).
fn in_netns<F, Fut>(test: &str, body: F)
where
    F: FnOnce(Ctx) -> Fut,
    Fut: Future<Output = ()>,
{
    if std::env::var_os(INSIDE).is_some() {
        let ctx = Ctx::set_up();
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(body(ctx));
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("unshare")
        .args(["--net", "--"])
        .arg(exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(INSIDE, "1")
        .output()
        .expect("running unshare (util-linux); these tests need root");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("test result: ok. 1 passed"),
        "{test} in its network namespace: {}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
}

macro_rules! netns_test {
    ($name:ident, $body:expr) => {
        #[test]
        fn $name() {
            in_netns(stringify!($name), $body);
        }
    };
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip(args: &[&str]) -> String {
    run("ip", args)
}

/// The links of this namespace, as `ip -d -j link` reports them.
fn links() -> Vec<Value> {
    serde_json::from_str(&ip(&["-d", "-j", "link", "show"])).unwrap()
}

fn link(name: &str) -> Option<Value> {
    links().into_iter().find(|l| l["ifname"] == name)
}

fn our_taps() -> Vec<String> {
    links()
        .iter()
        .filter_map(|l| l["ifname"].as_str())
        .filter(|n| n.starts_with("ctap-"))
        .map(str::to_string)
        .collect()
}

fn ipv4_addresses(name: &str) -> Vec<String> {
    let v: Vec<Value> =
        serde_json::from_str(&ip(&["-j", "-4", "addr", "show", "dev", name])).unwrap();
    v.iter()
        .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect()
}

fn ip_forward() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
        .unwrap()
        .trim()
        == "1"
}

/// Our nftables table, listed; `None` when it does not exist.
fn nft_table() -> Option<String> {
    let out = Command::new("nft")
        .args(["list", "table", "ip", "container"])
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

struct Ctx {
    dir: tempfile::TempDir,
}

impl Ctx {
    fn set_up() -> Self {
        let names: Vec<String> = links()
            .iter()
            .filter_map(|l| l["ifname"].as_str().map(str::to_string))
            .collect();
        assert_eq!(
            names,
            ["lo"],
            "not in a fresh network namespace: refusing to touch this one"
        );
        ip(&["link", "set", "lo", "up"]);
        ip(&[
            "link",
            "add",
            "uplink",
            "type",
            "veth",
            "peer",
            "name",
            "uplink-peer",
        ]);
        ip(&["addr", "add", "10.0.0.2/24", "dev", "uplink"]);
        ip(&["link", "set", "uplink", "up"]);
        ip(&["link", "set", "uplink-peer", "up"]);
        ip(&["route", "add", "default", "via", "10.0.0.1"]);
        assert!(
            !ip_forward(),
            "a fresh namespace starts with forwarding off"
        );
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn open_with(&self, subnet: &str, bridge: &str) -> Result<Network, NetworkError> {
        let host = Arc::new(RealHost::new().unwrap());
        Network::open(
            self.root(),
            &NetworkConfig {
                subnet: subnet.into(),
                bridge: bridge.into(),
                forward_address: std::net::Ipv4Addr::LOCALHOST.into(),
            },
            host,
        )
    }

    fn open(&self) -> Network {
        self.open_with(SUBNET, BRIDGE).unwrap()
    }

    fn lease_file(&self) -> Value {
        serde_json::from_slice(&std::fs::read(self.root().join("network/leases.json")).unwrap())
            .unwrap()
    }
}

netns_test!(
    attach_and_detach_configure_and_restore_the_host,
    |ctx: Ctx| async move {
        let net = ctx.open();
        let a = net.lease("alpha").unwrap();
        let b = net.lease("beta").unwrap();
        assert_ne!(a.ip, b.ip);
        assert!(link(BRIDGE).is_none(), "lease alone touches no link");

        let tap_a = net.attach("alpha").await.unwrap();
        assert_eq!(tap_a, tap_name("alpha"));
        let br = link(BRIDGE).expect("bridge created");
        assert_eq!(br["linkinfo"]["info_kind"], "bridge");
        assert!(br["flags"].as_array().unwrap().iter().any(|f| f == "UP"));
        assert_eq!(ipv4_addresses(BRIDGE), ["192.168.64.1/24"]);

        let tap = link(&tap_a).expect("tap created");
        assert_eq!(tap["master"], BRIDGE);
        assert!(tap["flags"].as_array().unwrap().iter().any(|f| f == "UP"));
        let tun = &tap["linkinfo"]["info_data"];
        assert_eq!(tun["type"], "tap", "{tap}");
        assert_eq!(tun["pi"], false, "{tap}");
        assert_eq!(tun["vnet_hdr"], true, "{tap}");
        assert_eq!(tun["persist"], true, "{tap}");
        assert_eq!(tun["user"], Value::Null, "no owner: root only ({tap})");

        assert!(ip_forward());
        let table = nft_table().expect("NAT table created");
        assert!(table.contains("ip saddr 192.168.64.0/24"), "{table}");
        assert!(table.contains("masquerade"), "{table}");

        let tap_b = net.attach("beta").await.unwrap();
        assert_ne!(tap_a, tap_b);
        net.detach("alpha").await.unwrap();
        assert!(link(&tap_a).is_none(), "detach deletes the tap");
        assert!(ip_forward() && nft_table().is_some(), "beta still runs");

        net.detach("beta").await.unwrap();
        net.detach("beta").await.unwrap();
        assert!(our_taps().is_empty());
        assert!(!ip_forward(), "forwarding restored");
        assert!(nft_table().is_none(), "NAT table deleted");
        assert_eq!(
            ipv4_addresses(BRIDGE),
            ["192.168.64.1/24"],
            "the bridge stays"
        );

        // A second round reuses the bridge and its address.
        net.attach("alpha").await.unwrap();
        assert_eq!(ipv4_addresses(BRIDGE), ["192.168.64.1/24"]);
        net.detach("alpha").await.unwrap();
    }
);

netns_test!(forwarding_that_was_on_stays_on, |ctx: Ctx| async move {
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").unwrap();
    let net = ctx.open();
    net.attach("alpha").await.unwrap();
    net.detach("alpha").await.unwrap();
    assert!(ip_forward());
});

netns_test!(
    leases_and_taps_survive_a_service_restart,
    |ctx: Ctx| async move {
        let net = ctx.open();
        let a = net.lease("alpha").unwrap();
        let b = net.lease("beta").unwrap();
        net.lease("gone").unwrap();
        let tap_a = net.attach("alpha").await.unwrap();
        drop(net);

        // The service restarts: alpha still runs, beta is stopped, `gone` was deleted meanwhile.
        let net = ctx.open();
        let known = ["alpha".to_string(), "beta".to_string()];
        let r = net.reconcile(&known, &known[..1]).await.unwrap();
        assert_eq!(r.released, ["gone"]);
        assert!(r.removed_taps.is_empty());
        assert_eq!(net.lease_of("alpha"), Some(a));
        assert_eq!(net.lease("beta").unwrap(), b, "sticky across restarts");
        assert_eq!(net.lease_of("gone"), None);
        assert_eq!(link(&tap_a).unwrap()["master"], BRIDGE);
        assert!(ip_forward() && nft_table().is_some());

        // rm of beta frees its address for the next machine.
        net.release("beta").unwrap();
        assert_eq!(net.lease("delta").unwrap().ip, b.ip);
        let file = ctx.lease_file();
        assert!(file["leases"].get("beta").is_none(), "{file}");
        assert_eq!(file["leases"]["delta"]["ip"], b.ip.to_string());

        // Restart after alpha died with the service: the tap goes, the host is restored, even
        // though this process never enabled forwarding itself.
        drop(net);
        let net = ctx.open();
        let r = net
            .reconcile(&["alpha".into(), "delta".into()], &[])
            .await
            .unwrap();
        assert_eq!(r.removed_taps, [tap_a]);
        assert!(our_taps().is_empty());
        assert!(!ip_forward());
        assert!(nft_table().is_none());
    }
);

netns_test!(
    reconcile_deletes_a_stale_tap_of_ours_only,
    |ctx: Ctx| async move {
        ip(&["tuntap", "add", "ctap-0123456789", "mode", "tap"]);
        ip(&["tuntap", "add", "usertap0", "mode", "tap"]);
        let net = ctx.open();
        let r = net.reconcile(&[], &[]).await.unwrap();
        assert_eq!(r.removed_taps, ["ctap-0123456789"]);
        assert!(link("ctap-0123456789").is_none());
        assert!(
            link("usertap0").is_some(),
            "a tap not named by us is left alone"
        );
    }
);

netns_test!(many_cycles_leak_nothing, |ctx: Ctx| async move {
    let net = ctx.open();
    let start = Instant::now();
    for i in 0..200 {
        let name = format!("m{i}");
        let lease = net.lease(&name).unwrap();
        assert_eq!(
            lease.ip,
            Ipv4Addr::new(192, 168, 64, 2),
            "the freed address is reused"
        );
        let tap = net.attach(&name).await.unwrap();
        assert!(link(&tap).is_some());
        net.detach(&name).await.unwrap();
        net.release(&name).unwrap();
    }
    eprintln!("200 cycles in {:?}", start.elapsed());
    assert!(our_taps().is_empty());
    assert!(net.leased().is_empty());
    assert_eq!(ctx.lease_file()["leases"], serde_json::json!({}));
    assert!(!ip_forward());
    assert!(nft_table().is_none());
    assert_eq!(ipv4_addresses(BRIDGE), ["192.168.64.1/24"]);
    let leftovers: Vec<_> = std::fs::read_dir(ctx.root().join("network"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, ["leases.json"]);
});

netns_test!(
    an_overlapping_subnet_is_refused_untouched,
    |ctx: Ctx| async move {
        let net = ctx.open_with("10.0.0.0/16", BRIDGE).unwrap();
        net.lease("alpha").unwrap();
        let e = net.attach("alpha").await.unwrap_err();
        assert!(matches!(e, NetworkError::Overlap { .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("10.0.0.0/24 (device uplink)"), "{msg}");
        assert!(msg.contains("[network]"), "{msg}");
        assert!(link(BRIDGE).is_none());
        assert!(our_taps().is_empty());
        assert!(!ip_forward() && nft_table().is_none());
    }
);

netns_test!(
    a_bridge_name_taken_by_another_link_is_refused,
    |ctx: Ctx| async move {
        ip(&[
            "link",
            "add",
            BRIDGE,
            "type",
            "veth",
            "peer",
            "name",
            "taken-peer",
        ]);
        let net = ctx.open();
        let e = net.attach("alpha").await.unwrap_err();
        assert!(matches!(e, NetworkError::BridgeNameTaken { .. }), "{e}");
        assert!(e.to_string().contains("`veth`"), "{e}");
        assert_eq!(link(BRIDGE).unwrap()["linkinfo"]["info_kind"], "veth");
        assert!(ipv4_addresses(BRIDGE).is_empty());
        assert!(our_taps().is_empty());
        assert!(!ip_forward() && nft_table().is_none());
    }
);

netns_test!(an_exhausted_subnet_is_an_error, |ctx: Ctx| async move {
    let net = ctx.open_with("192.168.70.0/29", BRIDGE).unwrap();
    for i in 0..5 {
        net.lease(&format!("m{i}")).unwrap();
    }
    let e = net.lease("m5").unwrap_err();
    assert!(matches!(e, NetworkError::Exhausted { .. }), "{e}");
    assert_eq!(net.leased().len(), 5);
});

/// A process holding a network namespace of its own, killed on drop.
struct Netns {
    child: Child,
}

impl Netns {
    fn new() -> Self {
        let child = Command::new("unshare")
            .args(["--net", "--", "sleep", "600"])
            .spawn()
            .unwrap();
        let mine = std::fs::read_link("/proc/self/ns/net").unwrap();
        let path = format!("/proc/{}/ns/net", child.id());
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_link(&path).ok().as_ref() == Some(&mine) || !Path::new(&path).exists() {
            assert!(
                Instant::now() < deadline,
                "unshare did not make a namespace"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Self { child }
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    fn run(&self, cmd: &[&str]) -> std::process::Output {
        Command::new("nsenter")
            .arg(format!("--net=/proc/{}/ns/net", self.child.id()))
            .arg("--")
            .args(cmd)
            .output()
            .unwrap()
    }

    fn ok(&self, cmd: &[&str]) {
        let out = self.run(cmd);
        assert!(
            out.status.success(),
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ping(from: Option<&Netns>, to: &str) {
    let cmd = ["busybox", "ping", "-c", "1", "-W", "3", to];
    match from {
        Some(ns) => ns.ok(&cmd),
        None => {
            run(cmd[0], &cmd[1..]);
        }
    }
}

netns_test!(
    a_guest_reaches_the_gateway_and_the_outside_through_nat,
    |ctx: Ctx| async move {
        // "outside": a namespace behind the uplink that has no route back to the machine subnet,
        // so its replies reach the guest only if the host masquerades.
        let outside = Netns::new();
        ip(&["link", "set", "uplink-peer", "netns", &outside.pid()]);
        outside.ok(&["ip", "link", "set", "lo", "up"]);
        outside.ok(&["ip", "addr", "add", "10.0.0.1/24", "dev", "uplink-peer"]);
        outside.ok(&["ip", "link", "set", "uplink-peer", "up"]);

        let net = ctx.open();
        let lease = net.lease("guest").unwrap();
        let config = net.guest_config("guest").unwrap();
        assert_eq!(config.address_cidr, lease.cidr());
        assert_eq!(config.gateway, "192.168.64.1");
        net.attach("guest").await.unwrap();

        let guest = veth_guest(&lease.mac, &config);

        ping(Some(&guest), &config.gateway);
        ping(None, &lease.ip.to_string());
        ping(Some(&guest), "10.0.0.1");

        // Without the machine's tap the NAT and forwarding go: the outside is unreachable again.
        net.detach("guest").await.unwrap();
        let out = guest.run(&["busybox", "ping", "-c", "1", "-W", "1", "10.0.0.1"]);
        assert!(
            !out.status.success(),
            "forwarding should be off after the last detach"
        );
        ip(&["link", "del", "gh"]);
    }
);

/// A fake upstream resolver on this namespace's `ip`:53, UDP and TCP: every A question is
/// answered with 192.0.2.10 (NXDOMAIN for `missing.test.`), every other type with no answer.
fn fake_resolver(ip: &str) {
    use hickory_proto::op::{Message, ResponseCode};
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{RData, Record, RecordType};
    fn answer(query: &[u8]) -> Vec<u8> {
        let q = Message::from_vec(query).unwrap();
        let mut r = Message::response(q.metadata.id, q.metadata.op_code);
        r.metadata.recursion_available = true;
        r.metadata.recursion_desired = q.metadata.recursion_desired;
        let question = q.queries[0].clone();
        if question.name().to_ascii() == "missing.test." {
            r.metadata.response_code = ResponseCode::NXDomain;
        } else if question.query_type() == RecordType::A {
            r.add_answer(Record::from_rdata(
                question.name().clone(),
                60,
                RData::A(A(Ipv4Addr::new(192, 0, 2, 10))),
            ));
        }
        r.add_query(question);
        r.to_vec().unwrap()
    }
    let udp = std::net::UdpSocket::bind((ip, 53)).unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, peer)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(&answer(&buf[..n]), peer);
        }
    });
    let tcp = std::net::TcpListener::bind((ip, 53)).unwrap();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for mut s in tcp.incoming().flatten() {
            let mut len = [0u8; 2];
            if s.read_exact(&mut len).is_err() {
                continue;
            }
            let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
            if s.read_exact(&mut q).is_err() {
                continue;
            }
            let a = answer(&q);
            let mut out = (a.len() as u16).to_be_bytes().to_vec();
            out.extend_from_slice(&a);
            let _ = s.write_all(&out);
        }
    });
}

/// Asks the gateway's responder for `name`'s A record from the namespace of `from` (the host
/// side when `None`), over UDP or TCP.
async fn ask_gateway(from: Option<&Netns>, name: &str, tcp: bool) -> hickory_proto::op::Message {
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RecordType};
    let ns = from.map(|n| format!("/proc/{}/ns/net", n.pid()));
    let name = name.to_string();
    // A thread of its own: one that entered the guest's namespace stays there.
    let asked = std::thread::spawn(move || {
        if let Some(ns) = ns {
            let file = std::fs::File::open(ns).unwrap();
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        }
        let mut q = Message::query();
        q.metadata.recursion_desired = true;
        q.add_query(Query::query(
            Name::from_ascii(&name).unwrap(),
            RecordType::A,
        ));
        let bytes = q.to_vec().unwrap();
        let at: std::net::SocketAddr = "192.168.64.1:53".parse().unwrap();
        let answer = container_testkit::dns_exchange(at, &bytes, tcp, Duration::from_secs(10));
        let answer = Message::from_vec(&answer).unwrap();
        assert_eq!(answer.metadata.id, q.metadata.id);
        answer
    });
    tokio::task::spawn_blocking(move || asked.join().unwrap())
        .await
        .unwrap()
}

/// A stand-in for a machine: a veth port of the bridge whose far end, `eth0`, lives in a
/// namespace of its own and is configured from the guest config, as the agent does inside
/// a machine.
fn veth_guest(mac: &str, config: &container_agent_proto::NetConfig) -> Netns {
    let guest = Netns::new();
    ip(&["link", "add", "gh", "type", "veth", "peer", "name", "eth0"]);
    ip(&["link", "set", "gh", "master", BRIDGE, "up"]);
    ip(&["link", "set", "eth0", "netns", &guest.pid()]);
    guest.ok(&["ip", "link", "set", "lo", "up"]);
    guest.ok(&["ip", "link", "set", "eth0", "address", mac]);
    guest.ok(&["ip", "addr", "add", &config.address_cidr, "dev", "eth0"]);
    guest.ok(&["ip", "link", "set", "eth0", "up"]);
    guest.ok(&["ip", "route", "add", "default", "via", &config.gateway]);
    guest
}

fn a_record(m: &hickory_proto::op::Message) -> Option<Ipv4Addr> {
    m.answers.iter().find_map(|r| match &r.data {
        hickory_proto::rr::RData::A(a) => Some(a.0),
        _ => None,
    })
}

netns_test!(
    a_guest_resolves_its_owners_machines_and_the_outside_through_the_gateway,
    |ctx: Ctx| async move {
        use container_apiserver::network::host_names::NoHostNames;
        use hickory_proto::op::ResponseCode;
        // The host's resolver: a fake one on this namespace's loopback (a loopback resolver,
        // as systemd-resolved's stub is, which a guest could never reach by itself).
        fake_resolver("127.0.0.1");
        let resolv = ctx.root().join("resolv.conf");
        std::fs::write(&resolv, "nameserver 192.168.64.1\nnameserver 127.0.0.1\n").unwrap();
        let net = ctx
            .open()
            .with_names("machine", Box::new(NoHostNames))
            .with_resolv_conf(resolv.clone());
        let lease = net.lease_owned("guest", 1000).unwrap();
        let peer = net.lease_owned("peer", 1000).unwrap();
        net.lease_owned("theirs", 1001).unwrap();
        let config = net.guest_config("guest").unwrap();
        assert_eq!(config.nameservers, ["192.168.64.1"]);
        net.attach("guest").await.unwrap();

        let guest = veth_guest(&lease.mac, &config);
        ping(Some(&guest), &config.gateway);

        // Its owner's machines by name; another owner's as if absent.
        let own = ask_gateway(Some(&guest), "peer.machine.", false).await;
        assert_eq!(a_record(&own), Some(peer.ip), "{own:?}");
        assert!(own.metadata.authoritative);
        let theirs = ask_gateway(Some(&guest), "theirs.machine.", false).await;
        assert_eq!(theirs.metadata.response_code, ResponseCode::NXDomain);
        assert!(theirs.answers.is_empty());

        // Any other name: relayed to the loopback resolver (the gateway in its list is skipped),
        // its answer relayed back, over UDP and TCP; its NXDOMAIN too.
        for tcp in [false, true] {
            let out = ask_gateway(Some(&guest), "www.example.test.", tcp).await;
            assert_eq!(out.metadata.response_code, ResponseCode::NoError, "{out:?}");
            assert_eq!(
                a_record(&out),
                Some(Ipv4Addr::new(192, 0, 2, 10)),
                "tcp {tcp}"
            );
            let missing = ask_gateway(Some(&guest), "missing.test.", tcp).await;
            assert_eq!(missing.metadata.response_code, ResponseCode::NXDomain);
        }
        // The host itself is not relayed for (it has its own resolver).
        let host = ask_gateway(None, "www.example.test.", false).await;
        assert_eq!(host.metadata.response_code, ResponseCode::Refused);

        // No resolver answers: SERVFAIL, soon; an edited resolv.conf counts at the next query.
        std::fs::write(&resolv, "nameserver 127.0.0.2\n").unwrap();
        let started = Instant::now();
        let failed = ask_gateway(Some(&guest), "www.example.test.", false).await;
        assert_eq!(failed.metadata.response_code, ResponseCode::ServFail);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        std::fs::write(&resolv, "nameserver 127.0.0.1\n").unwrap();
        let back = ask_gateway(Some(&guest), "www.example.test.", false).await;
        assert_eq!(a_record(&back), Some(Ipv4Addr::new(192, 0, 2, 10)));

        net.detach("guest").await.unwrap();
        ip(&["link", "del", "gh"]);
    }
);
