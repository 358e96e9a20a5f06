//! Machine networking end to end, inside the test process's own network namespace (the
//! service, its bridge and taps, the registry and every packet sent to a machine live there):
//! distinct sticky addresses shown by `ls`, a server in a machine answering the host at that
//! address, the guest's /etc/hosts and resolv.conf, `--network none`, addresses kept across
//! stop/start and service restarts and released at rm, and nothing left behind by a killed
//! service and a killed QEMU.

use std::time::{Duration, Instant};

use container_e2e::{Registry, Service, in_netns, is_root, kernel_config, require, test_image};

fn config() -> String {
    format!(
        "[machine]\ncpus = 1\nmemory = \"512M\"\n{}",
        kernel_config()
    )
}

/// The machines as `ls --format json` reports them.
fn machines(service: &Service) -> Vec<serde_json::Value> {
    serde_json::from_str(&service.cli_ok(&["machine", "ls", "--format", "json"])).unwrap()
}

fn ip_of(service: &Service, name: &str) -> Option<String> {
    machines(service)
        .into_iter()
        .find(|m| m["id"] == name)
        // The address kept across stops (`ipAddress` is there only while the machine runs).
        .and_then(|m| m["reservedIpAddress"].as_str().map(str::to_string))
}

/// Links in the test namespace whose name starts with `ctap-` (the service's taps).
fn taps() -> Vec<String> {
    let out = in_netns("ip")
        .args(["-o", "link", "show"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| n.starts_with("ctap-"))
        .collect()
}

/// GETs `url` from the test namespace (where the host side of the machine network is),
/// retrying while the server inside the machine comes up.
fn http_get(url: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = in_netns("curl")
            .args(["-sS", "--max-time", "5", url])
            .output()
            .unwrap();
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(
            Instant::now() < deadline,
            "{url} did not answer: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn leases(service: &Service) -> serde_json::Value {
    let text = std::fs::read_to_string(service.root.join("network/leases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn machines_are_reachable_at_sticky_addresses() {
    if !require(is_root(), "the service runs as root") {
        return;
    }
    let registry = Registry::start();
    let image = registry.push(&test_image("busybox"), "tests/busybox:1");
    let service = Service::start(&config());

    service.cli_ok(&["machine", "create", &image, "--name", "web"]);
    service.cli_ok(&["machine", "create", &image, "--name", "other"]);
    service.cli_ok(&[
        "machine",
        "create",
        &image,
        "--name",
        "offline",
        "--network",
        "none",
    ]);
    let web = ip_of(&service, "web").expect("web has an address");
    let other = ip_of(&service, "other").expect("other has an address");
    assert_ne!(web, other, "two machines, two addresses");
    assert!(web.starts_with("192.168.64."), "{web}");
    assert_eq!(ip_of(&service, "offline"), None);
    let table = service.cli_ok(&["machine", "ls"]);
    assert!(table.contains(&web) && table.contains(&other), "{table}");

    // Inside: the interface carries the address, /etc/hosts names the machine, the one
    // nameserver is the gateway (the service's responder).
    let addr = service.cli_ok(&["machine", "run", "-n", "web", "ip", "-4", "-o", "addr"]);
    assert!(addr.contains(&format!("{web}/24")), "{addr}");
    let hosts = service.cli_ok(&["machine", "run", "-n", "web", "cat", "/etc/hosts"]);
    assert!(
        hosts
            .lines()
            .any(|l| l.starts_with(&web) && l.contains("web")),
        "{hosts}"
    );
    let resolv = service.cli_ok(&["machine", "run", "-n", "web", "cat", "/etc/resolv.conf"]);
    let nameservers: Vec<&str> = resolv
        .lines()
        .filter_map(|l| l.strip_prefix("nameserver "))
        .collect();
    assert_eq!(nameservers, ["192.168.64.1"], "{resolv}");
    // The machine reaches the host side (its gateway) and the other machine.
    service.cli_ok(&[
        "machine",
        "run",
        "-n",
        "web",
        "ping",
        "-c",
        "1",
        "-W",
        "5",
        "192.168.64.1",
    ]);
    service.cli_ok(&[
        "machine", "run", "-n", "web", "ping", "-c", "1", "-W", "5", &other,
    ]);
    // `--network none`: loopback only.
    let links = service.cli_ok(&["machine", "run", "-n", "offline", "ls", "/sys/class/net"]);
    assert_eq!(
        links.split_whitespace().collect::<Vec<_>>(),
        ["lo"],
        "{links}"
    );

    // A server inside, bound to every interface, answers the host at the address ls printed.
    service.cli_ok(&[
        "machine",
        "run",
        "-n",
        "web",
        "--root",
        "--no-shell",
        "sh",
        "-c",
        "mkdir -p /srv/www && hostname > /srv/www/index.html",
    ]);
    service.cli_ok(&[
        "machine", "run", "-n", "web", "-d", "--root", "httpd", "-f", "-p", "8080", "-h",
        "/srv/www",
    ]);
    assert_eq!(http_get(&format!("http://{web}:8080/")).trim(), "web");

    // Sticky across stop/start and a service restart.
    service.cli_ok(&["machine", "stop", "web"]);
    assert_eq!(ip_of(&service, "web").as_deref(), Some(web.as_str()));
    assert_eq!(taps().len(), 1, "only the running machine has a tap");
    service.cli_ok(&["machine", "start", "web"]);
    assert_eq!(ip_of(&service, "web").as_deref(), Some(web.as_str()));
    service.stop_service();
    service.launch();
    assert_eq!(ip_of(&service, "web").as_deref(), Some(web.as_str()));
    let addr = service.cli_ok(&["machine", "run", "-n", "web", "ip", "-4", "-o", "addr"]);
    assert!(addr.contains(&format!("{web}/24")), "{addr}");

    // rm releases the address: the next machine takes the lowest free one, which is it.
    service.cli_ok(&["machine", "rm", "-f", "web"]);
    assert!(leases(&service).to_string().contains(&other));
    assert!(!leases(&service).to_string().contains(&format!("\"{web}\"")));
    service.cli_ok(&["machine", "create", &image, "--name", "next", "--no-boot"]);
    assert_eq!(ip_of(&service, "next").as_deref(), Some(web.as_str()));

    service.cli_ok(&["machine", "stop", "other"]);
    service.cli_ok(&["machine", "stop", "offline"]);
    assert_eq!(taps(), Vec::<String>::new(), "no tap outlives its machine");
}

#[test]
fn a_killed_service_and_a_killed_vm_leave_nothing_behind() {
    if !require(is_root(), "the service runs as root") {
        return;
    }
    let registry = Registry::start();
    let image = registry.push(&test_image("busybox"), "tests/busybox:1");
    let service = Service::start(&config());
    service.cli_ok(&["machine", "create", &image, "--name", "victim"]);
    let ip = ip_of(&service, "victim").unwrap();
    assert_eq!(taps().len(), 1);

    // The service dies, then the VM dies while no service watches it.
    service.kill_service();
    let run: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(service.root.join("machines/victim/run.json")).unwrap(),
    )
    .unwrap();
    let qemu = run["qemu"][0].as_i64().unwrap() as i32;
    let helpers: Vec<i32> = run["helpers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h[0].as_i64().unwrap() as i32)
        .collect();
    assert!(!helpers.is_empty(), "{run}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(qemu),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{qemu}/stat")).exists()
        && std::fs::read_to_string(format!("/proc/{qemu}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
    {
        assert!(Instant::now() < deadline, "QEMU did not die");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A lease of a machine that no longer exists (its directory vanished with the crash).
    std::fs::remove_dir_all(service.root.join("machines/victim")).unwrap();
    service.launch();
    assert_eq!(
        taps(),
        Vec::<String>::new(),
        "the stale tap is removed at start"
    );
    assert!(
        !leases(&service).to_string().contains(&ip),
        "the lease of a machine that is gone is freed: {}",
        leases(&service)
    );
    assert!(machines(&service).is_empty());
    // The helpers of the vanished machine's VM do not live on.
    for pid in helpers {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(
            stat.is_empty() || stat.contains(") Z "),
            "helper {pid} outlived its machine: {stat}"
        );
    }

    // 200 create/rm cycles leave no lease and no tap behind.
    for i in 0..200 {
        let name = format!("cycle{i}");
        service.cli_ok(&["machine", "create", &image, "--name", &name, "--no-boot"]);
        service.cli_ok(&["machine", "rm", &name]);
    }
    let book = leases(&service);
    assert!(
        !book.to_string().contains("cycle"),
        "leases left after 200 cycles: {book}"
    );
    assert_eq!(taps(), Vec::<String>::new());
}

#[test]
fn a_packaged_service_started_with_systemctl_answers_the_host() {
    if !require(is_root(), "the service runs as root") {
        return;
    }
    let registry = Registry::start();
    let image = registry.push(&test_image("nginx"), "tests/nginx:1");
    let service = Service::start(&format!(
        "[machine]\ncpus = 2\nmemory = \"1G\"\n{}",
        kernel_config()
    ));
    let alice = container_e2e::TestUser::ensure("ctalice", 1500);
    alice.cli_ok(&service, &["machine", "create", &image, "--name", "www"]);
    let ip = ip_of(&service, "www").expect("www has an address");
    // As the machine user, through sudo, once systemd is up.
    alice.cli_ok(
        &service,
        &[
            "machine",
            "run",
            "-n",
            "www",
            "--no-shell",
            "sh",
            "-c",
            "for i in $(seq 300); do case $(systemctl is-system-running 2>/dev/null) in running|degraded) break;; esac; sleep 0.2; done; sudo -n systemctl start nginx && systemctl is-active nginx",
        ],
    );
    let page = http_get(&format!("http://{ip}/"));
    assert!(page.contains("Welcome to nginx"), "{page}");
    alice.cli_ok(&service, &["machine", "stop", "www"]);
}
