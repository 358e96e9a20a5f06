//! Machine names on the host, inside the test process's own network namespace: the service's
//! responder on the gateway answers `NAME.machine` (A; AAAA empty; NXDOMAIN for unknown
//! names; REFUSED outside the domain), over UDP and TCP; it is a machine's one nameserver,
//! so a machine resolves its owner's machines by name and not another owner's, and any other
//! name through the service's resolvers (a fake one on the namespace's loopback, named in
//! the service's own resolv.conf); the service's hosts file (its own, never /etc/hosts) has every
//! machine after create, follows a rename, drops a machine at rm; `curl` by name reaches a
//! server in a machine; names survive a service restart; `inspect` shows `dnsName`. And ssh
//! for editors: `ssh-config` entries whose ProxyCommand goes through the service reach a
//! machine with no network at all, as the user, in their home.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::{Command, Output};
use std::time::Duration;

use container_e2e::{
    Registry, Service, TestUser, enter_netns, in_netns, is_root, kernel_config, require, test_image,
};
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

fn config() -> String {
    format!(
        "[machine]\ncpus = 1\nmemory = \"512M\"\nhome-mount = \"none\"\n{}",
        kernel_config()
    )
}

const RESPONDER: &str = "192.168.64.1:53";
/// What the fake upstream resolver answers for every A question but [`MISSING`].
const UPSTREAM_ANSWER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// A name the fake upstream resolver says does not exist.
const MISSING: &str = "missing.example.test.";

/// A resolver of the test's own on 127.0.0.1:53 of the test namespace (UDP), standing for
/// the host's: every A question but [`MISSING`] is [`UPSTREAM_ANSWER`], other types have no
/// answer.
fn fake_upstream() {
    use hickory_proto::rr::Record;
    use hickory_proto::rr::rdata::A;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        enter_netns();
        let socket = UdpSocket::bind("127.0.0.1:53").expect("port 53 of the test namespace");
        tx.send(()).unwrap();
        let mut buf = [0u8; 1500];
        while let Ok((n, peer)) = socket.recv_from(&mut buf) {
            let Ok(q) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut r = Message::response(q.metadata.id, q.metadata.op_code);
            r.metadata.recursion_desired = q.metadata.recursion_desired;
            r.metadata.recursion_available = true;
            for query in &q.queries {
                r.add_query(query.clone());
                if query.name().to_ascii().eq_ignore_ascii_case(MISSING) {
                    r.metadata.response_code = ResponseCode::NXDomain;
                } else if query.query_type() == RecordType::A {
                    r.add_answer(Record::from_rdata(
                        query.name().clone(),
                        60,
                        RData::A(A(UPSTREAM_ANSWER)),
                    ));
                }
            }
            let _ = socket.send_to(&r.to_vec().unwrap(), peer);
        }
    });
    rx.recv().unwrap();
}

/// Asks the responder from the test namespace (the host side), over UDP or TCP.
fn ask(name: &str, kind: RecordType, tcp: bool) -> Message {
    let name = name.to_string();
    std::thread::spawn(move || {
        enter_netns();
        let mut q = Message::query();
        q.metadata.recursion_desired = true;
        q.add_query(Query::query(Name::from_ascii(&name).unwrap(), kind));
        let bytes = q.to_vec().unwrap();
        let at: SocketAddr = RESPONDER.parse().unwrap();
        let answer = container_testkit::dns_exchange(at, &bytes, tcp, Duration::from_secs(5));
        let answer = Message::from_vec(&answer).unwrap();
        assert_eq!(answer.metadata.id, q.metadata.id);
        answer
    })
    .join()
    .unwrap()
}

fn address(name: &str) -> Option<Ipv4Addr> {
    let answer = ask(name, RecordType::A, false);
    answer.answers.iter().find_map(|r| match &r.data {
        RData::A(a) => Some(a.0),
        _ => None,
    })
}

fn rcode(name: &str) -> ResponseCode {
    ask(name, RecordType::A, false).metadata.response_code
}

fn lease(service: &Service, machine: &str) -> Ipv4Addr {
    let text = std::fs::read_to_string(service.root.join("network/leases.json")).unwrap();
    let leases: serde_json::Value = serde_json::from_str(&text).unwrap();
    leases["leases"][machine]["ip"]
        .as_str()
        .unwrap_or_else(|| panic!("{machine} has no lease: {text}"))
        .parse()
        .unwrap()
}

/// The `ADDRESS NAME` lines of the service's managed block.
fn hosts_block(service: &Service) -> Vec<(Ipv4Addr, String)> {
    let text = std::fs::read_to_string(&service.hosts_file).unwrap();
    assert!(
        text.starts_with("127.0.0.1\tlocalhost\n"),
        "the lines before the block are kept: {text}"
    );
    text.lines()
        .skip_while(|l| *l != "# BEGIN container machines")
        .skip(1)
        .take_while(|l| *l != "# END container machines")
        .map(|l| {
            let (ip, name) = l.split_once('\t').expect("ADDRESS\tNAME");
            (ip.parse().unwrap(), name.to_string())
        })
        .collect()
}

/// `curl http://HOST…` from the test namespace, resolving through the service's hosts file
/// (bind-mounted over /etc/hosts in a mount namespace of curl's own).
fn curl_by_name(service: &Service, url: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let out = in_netns("unshare")
            .args(["--mount", "sh", "-c"])
            .arg(r#"mount --bind "$1" /etc/hosts && exec curl -sS --max-time 5 "$2""#)
            .arg("sh")
            .arg(&service.hosts_file)
            .arg(url)
            .output()
            .unwrap();
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn machine_names_resolve_on_the_host_and_follow_create_rename_and_rm() {
    if !require(is_root(), "the service runs as root") {
        return;
    }
    let registry = Registry::start();
    let image = registry.push(&test_image("busybox"), "tests/busybox:1");
    let service = Service::start(&config());
    // The service's resolvers: the fake one on the namespace's loopback (a loopback resolver,
    // as systemd-resolved's stub is, that guests reach only through the service's relay).
    fake_upstream();
    std::fs::write(&service.resolv_conf, "nameserver 127.0.0.1\n").unwrap();
    let alice = TestUser::ensure("ctalice", 1500);
    let bob = TestUser::ensure("ctbob", 1501);
    alice.cli_ok(&service, &["machine", "create", &image, "--name", "a1"]);
    alice.cli_ok(&service, &["machine", "create", &image, "--name", "a2"]);
    bob.cli_ok(&service, &["machine", "create", &image, "--name", "b1"]);
    let (a1, a2, b1) = (
        lease(&service, "a1"),
        lease(&service, "a2"),
        lease(&service, "b1"),
    );

    // The host: every machine, by UDP and TCP; nothing outside the domain.
    assert_eq!(address("a1.machine."), Some(a1));
    assert_eq!(address("A2.Machine"), Some(a2));
    assert_eq!(address("b1.machine."), Some(b1));
    let tcp = ask("b1.machine.", RecordType::A, true);
    assert_eq!(tcp.answers.len(), 1, "{tcp:?}");
    let v6 = ask("a1.machine.", RecordType::AAAA, false);
    assert_eq!(v6.metadata.response_code, ResponseCode::NoError);
    assert!(v6.answers.is_empty(), "{v6:?}");
    assert_eq!(rcode("nope.machine."), ResponseCode::NXDomain);
    assert_eq!(rcode("example.com."), ResponseCode::Refused);

    // The hosts file: every machine with its address, the lines before it kept.
    let mut expected = vec![
        (a1, "a1.machine".to_string()),
        (a2, "a2.machine".to_string()),
        (b1, "b1.machine".to_string()),
    ];
    assert_eq!(hosts_block(&service), expected);
    let inspect: serde_json::Value =
        serde_json::from_str(&alice.cli_ok(&service, &["machine", "inspect", "a1"])).unwrap();
    assert_eq!(inspect[0]["dnsName"], "a1.machine");

    // A machine: its owner's machines, and another owner's not at all (as if absent).
    let lookup = |user: &TestUser, from: &str, name: &str| {
        user.cli(
            &service,
            &[
                "machine",
                "run",
                "-n",
                from,
                &format!("nslookup {name} 192.168.64.1"),
            ],
        )
    };
    let own = lookup(&alice, "a1", "a2.machine");
    let own_text = String::from_utf8_lossy(&own.stdout);
    assert!(
        own.status.success() && own_text.contains(&a2.to_string()),
        "a1 -> a2.machine: {own_text}{}",
        String::from_utf8_lossy(&own.stderr)
    );
    let theirs = lookup(&alice, "a1", "b1.machine");
    let theirs_text = String::from_utf8_lossy(&theirs.stdout);
    assert!(
        !theirs_text.contains(&b1.to_string()),
        "a1 must not learn b1's address: {theirs_text}"
    );
    assert!(theirs_text.contains("NXDOMAIN"), "{theirs_text}");
    let back = lookup(&bob, "b1", "a1.machine");
    assert!(!String::from_utf8_lossy(&back.stdout).contains(&a1.to_string()));

    // The gateway is a machine's one nameserver: names resolve with no server named, its
    // owner's machines, not another owner's, and every other name through the service's
    // resolver; the host asking for such a name is still refused (above).
    let resolv = alice.cli_ok(
        &service,
        &["machine", "run", "-n", "a1", "cat /etc/resolv.conf"],
    );
    assert_eq!(resolv, "nameserver 192.168.64.1\n");
    let resolve = |user: &TestUser, from: &str, name: &str| {
        let out = user.cli(
            &service,
            &["machine", "run", "-n", from, &format!("nslookup {name}")],
        );
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let own = resolve(&alice, "a1", "a2.machine");
    assert!(own.contains(&a2.to_string()), "a1 -> a2.machine: {own}");
    let back = resolve(&bob, "b1", "b1.machine");
    assert!(back.contains(&b1.to_string()), "b1 -> itself: {back}");
    let theirs = resolve(&alice, "a1", "b1.machine");
    assert!(
        theirs.contains("NXDOMAIN") && !theirs.contains(&b1.to_string()),
        "a1 -> b1.machine (bob's): {theirs}"
    );
    // Reverse lookups of the machine network: answered the same way, never relayed.
    let reverse = resolve(&alice, "a1", &a2.to_string());
    assert!(reverse.contains("a2.machine"), "a1 -> {a2}: {reverse}");
    let reverse = resolve(&alice, "a1", &b1.to_string());
    assert!(
        !reverse.contains("b1.machine") && !reverse.contains("example"),
        "a1 -> {b1} (bob's): {reverse}"
    );
    let outside = resolve(&alice, "a1", "www.example.test");
    assert!(
        outside.contains(&UPSTREAM_ANSWER.to_string()),
        "a1 -> a name outside the domain, through the fake upstream: {outside}"
    );
    let missing = resolve(&bob, "b1", MISSING.trim_end_matches('.'));
    assert!(
        missing.contains("NXDOMAIN"),
        "the upstream's NXDOMAIN: {missing}"
    );
    // No upstream answering: SERVFAIL from the relay, not a hang.
    std::fs::write(&service.resolv_conf, "nameserver 127.0.0.2\n").unwrap();
    let started = std::time::Instant::now();
    let failed = resolve(&alice, "a1", "www.example.test");
    assert!(
        failed.contains("SERVFAIL") && !failed.contains(&UPSTREAM_ANSWER.to_string()),
        "no upstream: {failed}"
    );
    eprintln!("SERVFAIL with no upstream took {:?}", started.elapsed());
    std::fs::write(&service.resolv_conf, "nameserver 127.0.0.1\n").unwrap();

    // By name from the host, through the hosts file.
    alice.cli_ok(
        &service,
        &[
            "machine",
            "run",
            "-n",
            "a1",
            "--root",
            "mkdir -p /srv/www && hostname > /srv/www/index.html",
        ],
    );
    alice.cli_ok(
        &service,
        &[
            "machine", "run", "-n", "a1", "-d", "--root", "httpd", "-f", "-p", "8080", "-h",
            "/srv/www",
        ],
    );
    assert_eq!(
        curl_by_name(&service, "http://a1.machine:8080/").trim(),
        "a1"
    );

    // Rename: the new name answers at once, the old one no more.
    // (Its resolv.conf made as an older version left it: the host's resolvers.)
    alice.cli_ok(
        &service,
        &[
            "machine",
            "run",
            "-n",
            "a2",
            "--root",
            "echo nameserver 10.9.9.9 > /etc/resolv.conf",
        ],
    );
    alice.cli_ok(&service, &["machine", "stop", "a2"]);
    alice.cli_ok(&service, &["machine", "rename", "a2", "a3"]);
    let a3 = lease(&service, "a3");
    assert_eq!(address("a3.machine."), Some(a3));
    assert_eq!(rcode("a2.machine."), ResponseCode::NXDomain);
    expected[1] = (a3, "a3.machine".to_string());
    assert_eq!(hosts_block(&service), expected);
    // At its next boot the gateway is its nameserver again, and names resolve inside it.
    alice.cli_ok(&service, &["machine", "start", "a3"]);
    let resolv = alice.cli_ok(
        &service,
        &["machine", "run", "-n", "a3", "cat /etc/resolv.conf"],
    );
    assert_eq!(resolv, "nameserver 192.168.64.1\n");
    let own = resolve(&alice, "a3", "a1.machine");
    assert!(own.contains(&a1.to_string()), "a3 -> a1.machine: {own}");

    // A restarted service answers the same names.
    service.stop_service();
    service.launch();
    assert_eq!(address("a1.machine."), Some(a1));
    assert_eq!(address("a3.machine."), Some(a3));
    assert_eq!(hosts_block(&service), expected);

    // rm: gone from both.
    bob.cli_ok(&service, &["machine", "rm", "-f", "b1"]);
    assert_eq!(rcode("b1.machine."), ResponseCode::NXDomain);
    expected.pop();
    assert_eq!(hosts_block(&service), expected);
    alice.cli_ok(&service, &["machine", "rm", "-f", "a1", "a3"]);
    assert_eq!(hosts_block(&service), vec![]);
    assert_eq!(
        std::fs::read_to_string(&service.hosts_file).unwrap(),
        "127.0.0.1\tlocalhost\n",
        "no machine left: no block"
    );
}

/// `ssh ARGS` as `user`, with `home` as HOME and XDG_CONFIG_HOME under it, the CLI that
/// ProxyCommand runs aimed at `service`.
fn ssh_as(user: &TestUser, service: &Service, home: &std::path::Path, args: &[&str]) -> Output {
    ssh_command(user, service, home, args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

fn ssh_command(
    user: &TestUser,
    service: &Service,
    home: &std::path::Path,
    args: &[&str],
) -> Command {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new("ssh");
    c.args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=120"])
        .args(args)
        .uid(user.uid)
        .gid(user.gid)
        .current_dir(home)
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env("USER", &user.name)
        .env("CONTAINER_SOCKET", &service.socket)
        .env_remove("SSH_AUTH_SOCK");
    c
}

/// The guest port the editor-like server listens on.
const EDITOR_PORT: u16 = 8765;

/// `ssh ARGS` as [`ssh_as`] runs it, with `input` on its stdin.
fn ssh_with_stdin(
    user: &TestUser,
    service: &Service,
    home: &std::path::Path,
    args: &[&str],
    input: &str,
) -> Output {
    use std::io::Write;
    let mut child = ssh_command(user, service, home, args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// An `ssh ARGS` running in the background (a tunnel), killed on drop.
struct Tunnel(std::process::Child);

impl Drop for Tunnel {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ssh_tunnel(user: &TestUser, service: &Service, home: &std::path::Path, args: &[&str]) -> Tunnel {
    Tunnel(
        ssh_command(user, service, home, args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .unwrap(),
    )
}

/// What a server behind host port `port` of loopback sends to a GET, tried until it answers.
fn fetch_through(port: u16, limit: Duration) -> String {
    use std::io::{Read, Write};
    let deadline = std::time::Instant::now() + limit;
    loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
            let mut reply = String::new();
            s.read_to_string(&mut reply)?;
            Ok(reply)
        })();
        match attempt {
            Ok(reply) if !reply.is_empty() => return reply,
            _ if std::time::Instant::now() > deadline => {
                panic!("nothing answered through 127.0.0.1:{port}: {attempt:?}")
            }
            _ => std::thread::sleep(Duration::from_millis(300)),
        }
    }
}

#[test]
fn ssh_reaches_a_machine_without_a_network_through_the_service() {
    if !require(is_root(), "the service runs as root") {
        return;
    }
    let registry = Registry::start();
    let image = registry.push(&test_image("sshd"), "tests/sshd:12");
    let service = Service::start(&format!(
        "[machine]\ncpus = 1\nmemory = \"768M\"\n{}",
        kernel_config()
    ));
    let alice = TestUser::ensure("ctalice", 1500);
    // HOME and the config directory of this test's own, alice's.
    let home = tempfile::Builder::new()
        .prefix("ct-ssh-")
        .tempdir_in("/tmp")
        .unwrap();
    nix::unistd::chown(home.path(), Some(alice.uid.into()), Some(alice.gid.into())).unwrap();
    let in_home = |args: &[&str]| {
        let out = alice
            .command(&service, home.path(), args)
            .env("HOME", home.path())
            .env("XDG_CONFIG_HOME", home.path().join(".config"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "container {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            container_e2e::tail(&service.log(), 30)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    in_home(&[
        "machine",
        "create",
        &image,
        "--name",
        "sshbox",
        "--network",
        "none",
        "--wait",
    ]);

    let config = in_home(&["machine", "ssh-config", "sshbox"]);
    assert!(config.contains("Host container-sshbox\n"), "{config}");
    assert!(config.contains("machine ssh-proxy sshbox\n"), "{config}");
    let file = home.path().join("ssh_config");
    std::fs::write(&file, &config).unwrap();
    let started = std::time::Instant::now();
    let who = ssh_as(
        &alice,
        &service,
        home.path(),
        &["-F", file.to_str().unwrap(), "container-sshbox", "whoami"],
    );
    assert!(
        who.status.success(),
        "ssh whoami: {}\n{}",
        String::from_utf8_lossy(&who.stderr),
        container_e2e::tail(&service.log(), 30)
    );
    assert_eq!(String::from_utf8_lossy(&who.stdout).trim(), alice.name);
    eprintln!(
        "first ssh (key authorised, host keys recorded): {:?}",
        started.elapsed()
    );
    let started = std::time::Instant::now();
    let pwd = ssh_as(
        &alice,
        &service,
        home.path(),
        &["-F", file.to_str().unwrap(), "container-sshbox", "pwd"],
    );
    assert_eq!(
        String::from_utf8_lossy(&pwd.stdout).trim(),
        alice.home.display().to_string(),
        "{}",
        String::from_utf8_lossy(&pwd.stderr)
    );
    eprintln!("second ssh: {:?}", started.elapsed());

    // What VS Code's Remote-SSH does: `ssh -T HOST bash` with a script on stdin that puts a
    // server under the home and starts it, then a local port forwarded to it (`ssh -L`).
    let server_dir = ".vscode-server-ct-e2e";
    let _ = std::fs::remove_dir_all(alice.home.join(server_dir));
    let script = format!(
        r#"set -e
mkdir -p ~/{server_dir}/bin/commit
printf 'hello from the editor server\n' > ~/{server_dir}/bin/commit/reply.txt
echo "PWD=$PWD"
echo "WHO=$(whoami)"
cd ~/{server_dir}/bin/commit
setsid -f perl -MIO::Socket::INET -e '
  my $l = IO::Socket::INET->new(LocalAddr => "127.0.0.1", LocalPort => {EDITOR_PORT},
                                Listen => 5, ReuseAddr => 1) or die "listen: $!";
  open(my $f, "<", "reply.txt") or die; my $body = <$f>; close $f;
  while (my $c = $l->accept) {{ print $c "HTTP/1.0 200 OK\r\n\r\n$body"; close $c; }}
' </dev/null >server.log 2>&1
echo STARTED
"#
    );
    let editor = ssh_with_stdin(
        &alice,
        &service,
        home.path(),
        &[
            "-F",
            file.to_str().unwrap(),
            "-T",
            "container-sshbox",
            "bash",
        ],
        &script,
    );
    let said = String::from_utf8_lossy(&editor.stdout).into_owned();
    assert!(
        editor.status.success() && said.contains("STARTED"),
        "ssh -T bash with a script: {said}{}",
        String::from_utf8_lossy(&editor.stderr)
    );
    assert!(
        said.contains(&format!("PWD={}\n", alice.home.display())),
        "{said}"
    );
    assert!(said.contains(&format!("WHO={}\n", alice.name)), "{said}");
    // The home is the host's (home-mount rw): the editor's files are there on the host too.
    assert_eq!(
        std::fs::read_to_string(alice.home.join(server_dir).join("bin/commit/reply.txt")).unwrap(),
        "hello from the editor server\n"
    );
    let local_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let tunnel = ssh_tunnel(
        &alice,
        &service,
        home.path(),
        &[
            "-F",
            file.to_str().unwrap(),
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            "-L",
            &format!("127.0.0.1:{local_port}:127.0.0.1:{EDITOR_PORT}"),
            "container-sshbox",
        ],
    );
    let reply = fetch_through(local_port, Duration::from_secs(60));
    drop(tunnel);
    assert!(
        reply.ends_with("hello from the editor server\n"),
        "through ssh -L: {reply:?}"
    );
    let _ = std::fs::remove_dir_all(alice.home.join(server_dir));
    // The key is authorised in the machine's own file, not in the (shared) home's.
    assert!(
        !alice.home.join(".ssh/authorized_keys").exists() || {
            let keys = std::fs::read_to_string(alice.home.join(".ssh/authorized_keys")).unwrap();
            !keys.contains("container@")
        }
    );
    let known =
        std::fs::read_to_string(home.path().join(".config/container/ssh/known_hosts")).unwrap();
    assert!(
        known.lines().all(|l| l.starts_with("container-sshbox "))
            && known.contains(" ssh-ed25519 "),
        "{known}"
    );

    // --install: the file, and one Include line at the top of ~/.ssh/config.
    std::fs::create_dir_all(home.path().join(".ssh")).unwrap();
    std::fs::write(home.path().join(".ssh/config"), "Host other\n  User x\n").unwrap();
    nix::unistd::chown(
        &home.path().join(".ssh"),
        Some(alice.uid.into()),
        Some(alice.gid.into()),
    )
    .unwrap();
    nix::unistd::chown(
        &home.path().join(".ssh/config"),
        Some(alice.uid.into()),
        Some(alice.gid.into()),
    )
    .unwrap();
    in_home(&["machine", "ssh-config", "--install"]);
    in_home(&["machine", "ssh-config", "--install"]);
    let user_config = std::fs::read_to_string(home.path().join(".ssh/config")).unwrap();
    let include = format!(
        "Include {}\n",
        home.path().join(".config/container/ssh_config").display()
    );
    assert!(user_config.starts_with(&include), "{user_config}");
    assert_eq!(user_config.matches("Include").count(), 1, "{user_config}");
    assert!(user_config.ends_with("Host other\n  User x\n"));
    // ssh finds ~ in the password database, not $HOME: name the file this test wrote.
    let user_config_path = home.path().join(".ssh/config");
    let via_include = ssh_as(
        &alice,
        &service,
        home.path(),
        &[
            "-F",
            user_config_path.to_str().unwrap(),
            "container-sshbox",
            "whoami",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&via_include.stdout).trim(),
        alice.name,
        "{}",
        String::from_utf8_lossy(&via_include.stderr)
    );
}
