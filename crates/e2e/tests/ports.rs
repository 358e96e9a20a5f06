//! Automatic port forwarding end to end: a server started in a machine answers on the
//! host's 127.0.0.1 at its own port with no flag, within 2 s of listening, and stops
//! answering within 2 s of stopping; a host port another program holds is shown refused and
//! left to it; forwarding needs no machine network (the machine here has `--network none`)
//! and comes back after a service restart; `set forward-ports=off` ends it at once; a port
//! published at create is listened on from the boot and stays through that.
//! Two users' machines listening on the same guest port do not collide: the first keeps the
//! host port, the second is shown refused (why, without naming the other), each user sees
//! only their own machines' ports, and the second takes the port once the first stops.
//! A UDP server in a machine answers datagrams sent to the host's 127.0.0.1 at its port,
//! each host client as a peer of its own, while client sockets and ports below 1024 in the
//! guest are left alone; it stops being forwarded once it stops.
//! Every request goes to 127.0.0.1 inside the test's own network namespace, where the
//! service runs.

use std::io::{Read, Write};
use std::net::UdpSocket;
use std::time::{Duration, Instant};

use container_e2e::{
    Registry, Service, TestUser, enter_netns, in_netns, is_root, kernel_config, require, tail,
    test_image,
};

/// How soon a change of the guest's listening sockets must show on the host.
const PROMPT: Duration = Duration::from_secs(2);

/// GETs `url` once from the test namespace: the body, or curl's complaint.
fn get(url: &str) -> Result<String, String> {
    let out = in_netns("curl")
        .args(["-sS", "--max-time", "2", url])
        .output()
        .unwrap();
    match out.status.success() {
        true => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
    }
}

/// Polls `check` every 100 ms until it holds or `limit` passes; how long it took. A failure
/// shows the end of the service's log.
fn within(
    service: &Service,
    limit: Duration,
    what: &str,
    mut check: impl FnMut() -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        if check() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{what}: not within {limit:?}; the service's log ends:\n{}",
            tail(&service.log(), 30)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The ports `machine ports --format json` lists.
fn ports(service: &Service, name: &str) -> Vec<serde_json::Value> {
    let text = service.cli_ok(&["machine", "ports", name, "--format", "json"]);
    serde_json::from_str(&text).unwrap()
}

/// A listener of the test's own on `127.0.0.1:port` in the test namespace, answering every
/// request with `body`: another program holding a host port.
fn host_server(port: u16, body: &'static str) -> std::net::SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        enter_netns();
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        tx.send(listener.local_addr().unwrap()).unwrap();
        for mut conn in listener.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf);
            let reply = format!(
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(reply.as_bytes());
        }
    });
    rx.recv().unwrap()
}

/// Sends `request` to `127.0.0.1:port` from the test namespace, half-closes, and reads the
/// reply to its end (at most 5 s): what a client that says it is done sending gets back.
fn half_closed_exchange(port: u16, request: &'static [u8]) -> std::io::Result<String> {
    std::thread::spawn(move || {
        enter_netns();
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", port))?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        conn.write_all(request)?;
        conn.shutdown(std::net::Shutdown::Write)?;
        let mut reply = String::new();
        conn.read_to_string(&mut reply)?;
        Ok(reply)
    })
    .join()
    .unwrap()
}

/// A service whose machines have one vCPU, `memory` and no home, and `image` (a test image
/// recipe) pushed to a registry of its own; the registry lives as long as the service.
fn service_with(recipe: &str, memory: &str) -> (Registry, String, Service) {
    let registry = Registry::start();
    let image = registry.push(&test_image(recipe), &format!("tests/{recipe}:1"));
    let service = Service::start(&format!(
        "[machine]\ncpus = 1\nmemory = \"{memory}\"\nhome-mount = \"none\"\n{}",
        kernel_config()
    ));
    (registry, image, service)
}

#[test]
fn a_server_in_a_machine_answers_on_the_hosts_loopback() {
    if !require(is_root(), "the service runs as root") {
        return;
    }
    let (_registry, image, service) = service_with("busybox", "512M");
    // No machine network: the forward goes over vsock.
    let boot = Instant::now();
    service.cli_ok(&[
        "machine",
        "create",
        &image,
        "--name",
        "web",
        "--network",
        "none",
        "--publish",
        "9090:8082",
    ]);
    eprintln!("booted in {:?}", boot.elapsed());
    service.cli_ok(&[
        "machine",
        "run",
        "-n",
        "web",
        "--root",
        "mkdir -p /srv/www && echo hello from web > /srv/www/index.html",
    ]);
    let url = "http://127.0.0.1:8080/";
    assert!(
        get(url).is_err(),
        "something answers before the server runs"
    );
    // The published port is listened on before anything in the guest listens.
    let published = "http://127.0.0.1:9090/";
    within(&service, PROMPT, "the published port listed", || {
        ports(&service, "web")
            .iter()
            .any(|p| p["hostPort"] == 9090 && p["published"] == true && p["state"] == "forwarded")
    });
    assert!(get(published).is_err(), "nothing listens on 8082 yet");

    // busybox httpd binds, then goes to the background: `run` returns once it listens.
    let httpd = "httpd -p 8080 -h /srv/www";
    service.cli_ok(&["machine", "run", "-n", "web", "--root", httpd]);
    let took = within(&service, PROMPT, "the forward after httpd listened", || {
        get(url).is_ok()
    });
    eprintln!("forwarded {took:?} after httpd listened");
    assert_eq!(get(url).unwrap().trim(), "hello from web");
    // A client that half-closes after its request gets the reply: a server that answers
    // once it has read everything (`wc -c`) sees the end of the input, not of the connection.
    let counter = "setsid nc -ll -p 8083 -e wc -c </dev/null >/dev/null 2>&1 &";
    service.cli_ok(&["machine", "run", "-n", "web", "--root", counter]);
    within(&service, PROMPT * 5, "the forward of 8083", || {
        ports(&service, "web")
            .iter()
            .any(|p| p["guestPort"] == 8083 && p["state"] == "forwarded")
    });
    let reply = half_closed_exchange(8083, b"twelve bytes").unwrap();
    assert_eq!(reply.trim(), "12", "the reply after a half-close");
    service.cli_ok(&["machine", "run", "-n", "web", "--root", "killall nc"]);
    within(
        &service,
        PROMPT * 5,
        "the end of the forward of 8083",
        || {
            ports(&service, "web")
                .iter()
                .all(|p| p["guestPort"] != 8083)
        },
    );
    let listed: Vec<_> = ports(&service, "web")
        .into_iter()
        .filter(|p| p["published"] == false)
        .collect();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["guestPort"], 8080);
    assert_eq!(listed[0]["hostAddress"], "127.0.0.1");
    assert_eq!(listed[0]["hostPort"], 8080);
    assert_eq!(listed[0]["state"], "forwarded");
    let inspect = service.cli_ok(&["machine", "inspect", "web"]);
    assert!(inspect.contains("\"guestPort\": 8080"), "{inspect}");
    let table = service.cli_ok(&["machine", "ports", "web"]);
    assert!(
        table.contains("127.0.0.1:8080") && table.contains("forwarded"),
        "{table}"
    );

    // Stopped, it stops answering.
    service.cli_ok(&["machine", "run", "-n", "web", "--root", "killall httpd"]);
    let took = within(
        &service,
        PROMPT,
        "the end of the forward after httpd stopped",
        || get(url).is_err(),
    );
    eprintln!("forward gone {took:?} after httpd stopped");
    // (A connection in between reaches the host, and is closed: nothing listens in the
    // guest.) The host port itself closes once the agent reports.
    let took = within(&service, PROMPT, "the host port's close", || {
        ports(&service, "web")
            .iter()
            .all(|p| p["published"] == true)
            && get(url).is_err()
    });
    eprintln!("host port closed {took:?} after that");

    // A host port already held is left to its holder and shown refused.
    let held = host_server(8081, "the host's own server");
    service.cli_ok(&[
        "machine",
        "run",
        "-n",
        "web",
        "--root",
        "httpd -p 8081 -h /srv/www",
    ]);
    within(&service, PROMPT * 2, "8081 listed refused", || {
        ports(&service, "web")
            .iter()
            .any(|p| p["guestPort"] == 8081 && p["state"] == "refused")
    });
    let refused: Vec<_> = ports(&service, "web")
        .into_iter()
        .filter(|p| p["guestPort"] == 8081)
        .collect();
    let reason = refused[0]["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(reason.contains("in use"), "{refused:?}");
    assert_eq!(
        get(&format!("http://{held}/")).unwrap(),
        "the host's own server"
    );
    let table = service.cli_ok(&["machine", "ports", "web"]);
    assert!(table.contains("refused"), "{table}");

    // Forwarding comes back after a service restart (the machine keeps running).
    service.cli_ok(&["machine", "run", "-n", "web", "--root", httpd]);
    within(&service, PROMPT, "the forward before the restart", || {
        get(url).is_ok()
    });
    service.stop_service();
    assert!(get(url).is_err(), "the stopped service still forwards");
    let restart = Instant::now();
    service.launch();
    let took = within(
        &service,
        Duration::from_secs(30),
        "the forward after a restart",
        || get(url).is_ok(),
    );
    eprintln!(
        "forward back {took:?} after the service restarted ({:?} in all)",
        restart.elapsed()
    );
    assert_eq!(get(url).unwrap().trim(), "hello from web");

    // The published port reaches the guest port once something listens there, at its own
    // host port only.
    service.cli_ok(&[
        "machine",
        "run",
        "-n",
        "web",
        "--root",
        "httpd -p 8082 -h /srv/www",
    ]);
    assert_eq!(get(published).unwrap().trim(), "hello from web");
    std::thread::sleep(PROMPT);
    assert!(
        get("http://127.0.0.1:8082/").is_err(),
        "a published guest port is forwarded twice"
    );

    // forward-ports=off ends it at once (not the published port), on brings it back; a stop
    // ends it all.
    service.cli_ok(&["machine", "set", "-n", "web", "forward-ports=off"]);
    within(
        &service,
        PROMPT,
        "the end of the forward after set off",
        || get(url).is_err(),
    );
    assert_eq!(get(published).unwrap().trim(), "hello from web");
    service.cli_ok(&["machine", "set", "-n", "web", "forward-ports=on"]);
    within(&service, PROMPT, "the forward after set on", || {
        get(url).is_ok()
    });
    service.cli_ok(&["machine", "stop", "web"]);
    assert!(get(url).is_err(), "a stopped machine still forwards");
    assert!(
        get(published).is_err(),
        "a stopped machine still has its published port"
    );
    assert_eq!(
        get(&format!("http://{held}/")).unwrap(),
        "the host's own server"
    );
}

/// The ports `machine ports NAME --format json` lists for `user`.
fn ports_as(user: &TestUser, service: &Service, name: &str) -> Vec<serde_json::Value> {
    let text = user.cli_ok(service, &["machine", "ports", name, "--format", "json"]);
    serde_json::from_str(&text).unwrap()
}

#[test]
fn two_users_machines_listening_on_the_same_port_do_not_collide() {
    if !require(is_root(), "the service runs as root") {
        return;
    }
    let (_registry, image, service) = service_with("busybox", "512M");
    let alice = TestUser::ensure("ctalice", 1500);
    let bob = TestUser::ensure("ctbob", 1501);
    let url = "http://127.0.0.1:8080/";
    let serve = |user: &TestUser, machine: &str| {
        let script = format!(
            "mkdir -p /srv/www && echo {} > /srv/www/index.html && httpd -p 8080 -h /srv/www",
            user.name
        );
        user.cli_ok(
            &service,
            &["machine", "run", "-n", machine, "--root", &script],
        );
    };
    // Each user's machine, with no network: forwarding goes over vsock.
    for (user, machine) in [(&alice, "web-a"), (&bob, "web-b")] {
        user.cli_ok(
            &service,
            &[
                "machine",
                "create",
                &image,
                "--name",
                machine,
                "--network",
                "none",
            ],
        );
    }

    // Alice's server listens first and gets the host port.
    serve(&alice, "web-a");
    within(&service, PROMPT, "alice's forward", || {
        get(url).is_ok_and(|body| body.trim() == alice.name)
    });
    // Bob's listens on the same guest port: his forward is refused, with the reason, and
    // alice's server still answers.
    serve(&bob, "web-b");
    within(&service, PROMPT * 2, "bob's 8080 listed refused", || {
        ports_as(&bob, &service, "web-b")
            .iter()
            .any(|p| p["guestPort"] == 8080 && p["state"] == "refused")
    });
    let refused: Vec<_> = ports_as(&bob, &service, "web-b")
        .into_iter()
        .filter(|p| p["guestPort"] == 8080)
        .collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0]["hostPort"], 8080);
    let reason = refused[0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("in use"), "{refused:?}");
    assert!(
        !reason.contains("web-a") && !reason.contains(&alice.name),
        "the reason names another user's machine: {reason}"
    );
    let table = bob.cli_ok(&service, &["machine", "ports", "web-b"]);
    assert!(
        table.contains("127.0.0.1:8080") && table.contains("refused") && table.contains("in use"),
        "{table}"
    );
    for _ in 0..3 {
        assert_eq!(
            get(url).unwrap().trim(),
            alice.name,
            "alice's server keeps the port"
        );
    }
    let alices = ports_as(&alice, &service, "web-a");
    assert!(
        alices
            .iter()
            .any(|p| p["guestPort"] == 8080 && p["state"] == "forwarded"),
        "{alices:?}"
    );

    // Each user sees their own machines' ports only.
    for (user, theirs) in [(&alice, "web-b"), (&bob, "web-a")] {
        let out = user.cli(&service, &["machine", "ports", theirs]);
        assert_eq!(
            out.status.code(),
            Some(3),
            "{} sees {theirs}'s ports: {}",
            user.name,
            String::from_utf8_lossy(&out.stdout)
        );
        let listed = user.cli_ok(&service, &["machine", "ls", "-q"]);
        assert!(!listed.contains(theirs), "{listed}");
    }

    // Alice's machine stops: bob's forward takes the port within a few seconds.
    alice.cli_ok(&service, &["machine", "stop", "web-a"]);
    let took = within(
        &service,
        Duration::from_secs(5),
        "bob's forward after alice's machine stopped",
        || get(url).is_ok_and(|body| body.trim() == bob.name),
    );
    eprintln!("bob's server answered {took:?} after alice's machine stopped");
    within(&service, PROMPT, "bob's 8080 listed forwarded", || {
        ports_as(&bob, &service, "web-b")
            .iter()
            .any(|p| p["guestPort"] == 8080 && p["state"] == "forwarded")
    });
    assert!(ports_as(&alice, &service, "web-a").is_empty());

    alice.cli_ok(&service, &["machine", "rm", "-f", "web-a"]);
    bob.cli_ok(&service, &["machine", "rm", "-f", "web-b"]);
}

/// A UDP client of the test's own, in the test namespace: one source port for all its
/// datagrams, as a real client has.
struct UdpClient(std::sync::mpsc::Sender<(Vec<u8>, std::sync::mpsc::Sender<UdpAnswer>)>);

/// What a datagram sent to a host port brought back.
#[derive(Debug, PartialEq)]
enum UdpAnswer {
    Reply(String),
    /// ICMP port unreachable: nothing on the host holds the port.
    Refused,
    /// No answer within a second.
    Silence,
}

impl UdpClient {
    /// A client of `127.0.0.1:port`.
    fn new(port: u16) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<(Vec<u8>, std::sync::mpsc::Sender<UdpAnswer>)>();
        std::thread::spawn(move || {
            enter_netns();
            let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
            socket.connect(("127.0.0.1", port)).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(1)))
                .unwrap();
            for (datagram, answer) in rx {
                // A refusal of an earlier datagram may be pending: it is not this one's.
                let _ = socket.take_error();
                let got = match socket.send(&datagram).and_then(|_| {
                    let mut buf = [0u8; 2048];
                    socket.recv(&mut buf).map(|n| buf[..n].to_vec())
                }) {
                    Ok(reply) => UdpAnswer::Reply(String::from_utf8_lossy(&reply).into_owned()),
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        UdpAnswer::Refused
                    }
                    Err(_) => UdpAnswer::Silence,
                };
                let _ = answer.send(got);
            }
        });
        UdpClient(tx)
    }

    fn ask(&self, datagram: &str) -> UdpAnswer {
        let (tx, rx) = std::sync::mpsc::channel();
        self.0.send((datagram.as_bytes().to_vec(), tx)).unwrap();
        rx.recv().unwrap()
    }
}

/// The guest's UDP server: answers each datagram with the port its peer (the agent's socket
/// for one host client) sent it from, then the datagram. Beside it, as a machine has them,
/// an unconnected client socket (an ephemeral port) and a socket on port 999: neither is
/// forwarded.
const UDP_ECHO: &str = r#"
use IO::Socket::INET;
my $client = IO::Socket::INET->new(Proto => "udp", LocalAddr => "0.0.0.0") or die "client: $!";
my $low = IO::Socket::INET->new(Proto => "udp", LocalAddr => "0.0.0.0", LocalPort => 999) or die "999: $!";
my $s = IO::Socket::INET->new(Proto => "udp", LocalAddr => "0.0.0.0", LocalPort => 7070) or die "7070: $!";
while (defined($s->recv(my $m, 65535))) { $s->send($s->peerport . " " . $m) }
"#;

#[test]
fn a_udp_server_in_a_machine_answers_on_the_hosts_loopback() {
    if !require(is_root(), "the service runs as root") {
        return;
    }
    // Debian for its perl (busybox has no UDP server applet).
    let (_registry, image, service) = service_with("debian", "1G");
    let boot = Instant::now();
    service.cli_ok(&[
        "machine",
        "create",
        &image,
        "--name",
        "dns",
        "--network",
        "none",
        "--publish",
        "5300:53/udp",
        "--wait",
    ]);
    eprintln!("booted in {:?}", boot.elapsed());
    let udp = |p: &serde_json::Value| p["protocol"] == "udp";
    // The published UDP port is held from the boot; nothing else is forwarded over UDP.
    within(&service, PROMPT, "the published UDP port listed", || {
        ports(&service, "dns")
            .iter()
            .any(|p| udp(p) && p["hostPort"] == 5300 && p["state"] == "forwarded")
    });
    let first = UdpClient::new(7070);
    assert_eq!(
        first.ask("hello"),
        UdpAnswer::Refused,
        "7070 held before the server runs"
    );

    service.cli_ok(&[
        "machine",
        "run",
        "-d",
        "--no-shell",
        "-n",
        "dns",
        "--root",
        "perl",
        "-e",
        UDP_ECHO,
    ]);
    // `run -d` returns before perl has bound its socket: the guest's own table says when.
    let bound = || {
        let udp = service.cli_ok(&["machine", "run", "-n", "dns", "cat", "/proc/net/udp"]);
        udp.contains(":1B9E ")
    };
    within(
        &service,
        Duration::from_secs(60),
        "the server's socket bound",
        bound,
    );
    let mut answer = UdpAnswer::Silence;
    let took = within(&service, PROMPT, "an answer from the UDP server", || {
        answer = first.ask("hello");
        matches!(answer, UdpAnswer::Reply(_))
    });
    eprintln!("UDP answered {took:?} after the server was bound");
    let UdpAnswer::Reply(reply) = answer else {
        unreachable!()
    };
    let (peer, text) = reply.split_once(' ').unwrap();
    assert_eq!(text, "hello");
    // One host client is one peer for the guest's server; another client, another peer.
    assert_eq!(
        first.ask("again"),
        UdpAnswer::Reply(format!("{peer} again"))
    );
    let second = UdpClient::new(7070);
    let UdpAnswer::Reply(reply) = second.ask("other") else {
        panic!("no answer to a second client")
    };
    let (other_peer, text) = reply.split_once(' ').unwrap();
    assert_eq!(text, "other");
    assert_ne!(other_peer, peer, "two host clients share one guest peer");

    // Listed as UDP; the client socket and port 999 are not forwarded.
    let listed: Vec<_> = ports(&service, "dns")
        .into_iter()
        .filter(|p| udp(p) && p["published"] == false)
        .collect();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["guestPort"], 7070);
    assert_eq!(listed[0]["hostPort"], 7070);
    assert_eq!(listed[0]["state"], "forwarded");
    let table = service.cli_ok(&["machine", "ports", "dns"]);
    assert!(
        table.contains("7070/udp") && table.contains("53/udp (published)"),
        "{table}"
    );
    assert!(
        !table.contains("999/udp") && !table.contains("10999"),
        "{table}"
    );

    // Stopped, it stops being forwarded: the host port is let go.
    service.cli_ok(&["machine", "run", "-n", "dns", "--root", "pkill perl"]);
    let took = within(&service, PROMPT, "the host's UDP port let go", || {
        first.ask("gone?") == UdpAnswer::Refused
    });
    eprintln!("UDP port let go {took:?} after the server stopped");
    assert!(
        ports(&service, "dns")
            .iter()
            .all(|p| p["guestPort"] != 7070)
    );

    // A stop ends the published one too.
    service.cli_ok(&["machine", "stop", "dns"]);
    assert_eq!(UdpClient::new(5300).ask("stopped?"), UdpAnswer::Refused);
}
