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

/// A small generator (xorshift64), seeded from `CRASH_SOAK_SEED` or the clock, so a round
/// that fails can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Processes other than the service whose command line names `dir` (QEMU and
/// vhost-device-vsock name their runtime directory).
fn processes_naming(dir: &std::path::Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| {
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            let vm_process = cmdline.contains(&needle) && !cmdline.contains("container-apiserver");
            (vm_process && !stat.contains(") Z ")).then_some(cmdline)
        })
        .collect()
}

/// Every listed machine is usable: it settles, and runs a command (a stopped one is started
/// by it). The machines' names.
fn every_machine_runs_a_command(service: &Service) -> Vec<String> {
    let list: Vec<serde_json::Value> =
        serde_json::from_str(&service.cli_ok(&["machine", "ls", "--format", "json"])).unwrap();
    let mut names = Vec::new();
    for m in list {
        let name = m["id"].as_str().unwrap().to_string();
        let m = settled(service, &name, Duration::from_secs(120));
        let status = m["status"].as_str().unwrap_or_default().to_string();
        assert!(
            ["running", "stopped"].contains(&status.as_str()),
            "{name} is {status}: {m}"
        );
        let out = service.cli(&["machine", "run", "--root", "-n", &name, "true"]);
        assert!(
            out.status.success(),
            "{name} was {status} but cannot run a command: {}\nits helpers' log: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(
                service
                    .root
                    .join("machines")
                    .join(&name)
                    .join("helpers.log")
            )
            .unwrap_or_default(),
            tail(&service.log(), 30)
        );
        names.push(name);
    }
    names
}

#[test]
fn a_service_killed_at_random_moments_leaves_every_machine_usable_or_gone() {
    if !require(is_root(), "the service runs as root") {
        return;
    }
    let rounds: u32 = std::env::var("CRASH_SOAK_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let seed = std::env::var("CRASH_SOAK_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("soak: {rounds} rounds, CRASH_SOAK_SEED={seed}");
    let mut rng = Rng(seed);
    let registry = Registry::start();
    let image = registry.push(&test_image("busybox"), "tests/busybox:1");
    let other = registry.push(&test_image("busybox"), "tests/busybox:2");
    // No shares: every process of a VM names its runtime directory, so none can hide.
    let service = Service::start(&format!(
        "[machine]\ncpus = 1\nmemory = \"512M\"\nhome-mount = \"none\"\n[runtime]\nboot-timeout = 60\n{}",
        kernel_config()
    ));
    service.cli_ok(&["machine", "create", &image, "--name", "base"]);
    let blob = service.dir.path().join("blob");
    std::fs::write(&blob, vec![7u8; 4 << 20]).unwrap();
    let blob = blob.to_string_lossy().into_owned();

    const OPS: [&str; 10] = [
        "create", "start", "stop", "rm", "set", "pull", "cp", "clone", "snapshot", "commit",
    ];
    for round in 0..rounds {
        let op = OPS[rng.below(OPS.len() as u64) as usize];
        let delay = Duration::from_millis(rng.below(3000));
        let name = format!("r{round}");
        let size = format!("disk-size={}G", 65 + round);
        let committed = format!("tests/committed:{round}");
        // Each operation gets something to do.
        let args: Vec<&str> = match op {
            "create" => vec!["machine", "create", &image, "--name", &name],
            "start" => {
                service.cli_ok(&["machine", "stop", "base"]);
                vec!["machine", "start", "base"]
            }
            "stop" => vec!["machine", "stop", "base"],
            "rm" => {
                service.cli_ok(&["machine", "create", &image, "--name", &name]);
                vec!["machine", "rm", "-f", &name]
            }
            "set" => {
                service.cli_ok(&["machine", "stop", "base"]);
                vec!["machine", "set", "-n", "base", &size]
            }
            "pull" => vec!["image", "pull", &other],
            // Of a running machine: the guest's filesystem frozen, the disk switched live.
            "clone" => vec!["machine", "clone", "base", &name],
            "snapshot" => vec!["machine", "snapshot", "create", "base", &name],
            "commit" => vec!["machine", "commit", "base", &committed],
            _ => vec!["machine", "cp", &blob, "base:/tmp/blob"],
        };
        let mut cut = service
            .command(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        let finished = cut.try_wait().unwrap().is_some();
        service.kill_service();
        let _ = cut.wait();
        let restarted = Instant::now();
        service.launch();
        let names = every_machine_runs_a_command(&service);
        eprintln!(
            "round {round}: {op} killed after {} ms{}: {names:?} usable {:.1} s after the restart",
            delay.as_millis(),
            if finished { " (it had finished)" } else { "" },
            restarted.elapsed().as_secs_f64()
        );
        assert!(names.contains(&"base".to_string()), "base is gone");
        // A snapshot is listed whole or not at all, and base still takes new ones.
        let snaps = service.cli_ok(&["machine", "snapshot", "ls", "base", "--format", "json"]);
        let snaps: Vec<serde_json::Value> = serde_json::from_str(&snaps).unwrap();
        if op == "snapshot" {
            service.cli_ok(&[
                "machine",
                "snapshot",
                "create",
                "base",
                &format!("after{round}"),
            ]);
        }
        eprintln!("round {round}: base has {} snapshots", snaps.len());
        // An image is whole or absent: a pulled one makes a machine.
        if service.cli(&["image", "inspect", &other]).status.success() {
            let probe = format!("p{round}");
            service.cli_ok(&["machine", "create", &other, "--name", &probe, "--no-boot"]);
            service.cli_ok(&["machine", "rm", &probe]);
            service.cli_ok(&["image", "rm", &other]);
        }
        // A commit is a whole image or none: one that is listed makes a machine.
        if service
            .cli(&["image", "inspect", &committed])
            .status
            .success()
        {
            let probe = format!("q{round}");
            service.cli_ok(&["machine", "create", &committed, "--name", &probe]);
            service.cli_ok(&["machine", "run", "--root", "-n", &probe, "true"]);
            service.cli_ok(&["machine", "rm", "-f", &probe]);
            service.cli_ok(&["image", "rm", &committed]);
        }
        if names.contains(&name) {
            service.cli_ok(&["machine", "rm", "-f", &name]);
        }
    }

    // Nothing is left once the machines are gone.
    service.cli_ok(&["machine", "rm", "-f", "base"]);
    assert_eq!(
        processes_naming(&service.run_dir),
        Vec::<String>::new(),
        "processes outlived their machines"
    );
    let vm_dirs: Vec<_> = std::fs::read_dir(service.run_dir.join("vm"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert_eq!(
        vm_dirs,
        Vec::<std::path::PathBuf>::new(),
        "runtime directories left"
    );
    let machine_dirs: Vec<_> = std::fs::read_dir(service.root.join("machines"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "defaults.json")
        .collect();
    assert_eq!(machine_dirs, Vec::<String>::new(), "machine files left");
    let layers: Vec<_> = std::fs::read_dir(service.root.join("layers"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert_eq!(layers, Vec::<std::ffi::OsString>::new(), "disk layers left");
    let leases = std::fs::read_to_string(service.root.join("network/leases.json")).unwrap();
    for round in 0..rounds {
        assert!(!leases.contains(&format!("\"r{round}\"")), "{leases}");
    }
    assert!(!leases.contains("\"base\""), "{leases}");
    let taps = container_e2e::in_netns("ip")
        .args(["-o", "link", "show"])
        .output()
        .unwrap();
    let taps = String::from_utf8_lossy(&taps.stdout);
    assert!(!taps.contains("ctap-"), "taps left: {taps}");
}
