//! `container machine` end to end on a Debian 12 image whose init is OpenRC (openrc-init as
//! /sbin/init, no systemd): OpenRC reaching its default runlevel under the agent, sudo, a
//! service started with rc-service, and `machine stop` shutting OpenRC down cleanly by
//! default, right after create too.

use std::time::{Duration, Instant};

use container_e2e::{
    FORCED_POWER_OFF, Registry, Service, TestUser, is_root, kernel_config, require, test_image,
};

fn config() -> String {
    format!("[machine]\ncpus = 2\nmemory = \"1G\"\n{}", kernel_config())
}

/// What the service logs when a machine outlived the stop timeout (or the agent never took
/// the request). openrc-init kills every process, the agent included, before it halts or
/// reboots, so a machine left halted shows up here, never as `FORCED_POWER_OFF` on the console.
const HOST_FORCED: &str = "forcing";
/// The kernel's last line when init halted instead of powering off or rebooting: the VM
/// would sit there until the service forces it off.
const HALTED: &str = "System halted";
/// `machine stop`'s default timeout (`DEFAULT_STOP_TIMEOUT`): a forced stop takes at least
/// this long.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// A shell loop that waits until OpenRC has reached its default runlevel, and prints it.
/// openrc-init makes its control FIFO only once `openrc default` has returned (every service
/// of the runlevel started); the runlevel name alone is set as OpenRC enters it.
const WAIT_FOR_DEFAULT: &str = "for i in $(seq 600); do \
       [ \"$(rc-status --runlevel)\" = default ] && [ -p /run/openrc/init.ctl ] && break; \
       sleep 0.2; done; rc-status --runlevel";

/// Stops `name` with the defaults and checks that init took the machine down on its own:
/// quickly, the agent's stop line on the console and no forced power-off on either side.
/// Returns the console.
fn stop_cleanly(user: &TestUser, service: &Service, name: &str) -> String {
    let started = Instant::now();
    user.cli_ok(service, &["machine", "stop", name]);
    let took = started.elapsed();
    let console = user.cli_ok(service, &["machine", "logs", name]);
    let (_, after) = console
        .split_once("stopping: signal")
        .unwrap_or_else(|| panic!("the agent sent no stop signal:\n{console}"));
    // openrc-init's own shutdown (the runlevel, then the final signals) took it down.
    assert!(after.contains("Sending the final term signal"), "{console}");
    assert!(!console.contains(FORCED_POWER_OFF), "{console}");
    assert!(!console.contains(HALTED), "init halted the VM:\n{console}");
    let log = service.log();
    assert!(
        !log.contains(HOST_FORCED),
        "the service forced the machine off:\n{}\nconsole:\n{console}",
        container_e2e::tail(&log, 20)
    );
    assert!(
        took < STOP_TIMEOUT,
        "the stop took {took:?}, as long as a forced one:\n{console}"
    );
    let ls = user.cli_ok(service, &["m", "ls"]);
    assert!(ls.contains("stopped"), "{ls}");
    eprintln!("{name}: stopped in {took:.1?}");
    console
}

#[test]
fn openrc_boots_to_default_and_stops_cleanly() {
    if !require(is_root(), "the service runs as root") {
        return;
    }
    let registry = Registry::start();
    let image = registry.push(&test_image("openrc"), "tests/openrc:1");
    let service = Service::start(&config());
    let alice = TestUser::ensure("ctalice", 1500);
    let run = |args: &[&str]| {
        let mut full = vec!["machine", "run", "-n", "orc"];
        full.extend_from_slice(args);
        alice.cli_ok(&service, &full)
    };

    let started = Instant::now();
    // `--wait` returns once OpenRC has reached its default runlevel, and `ls` says so.
    alice.cli_ok(
        &service,
        &["machine", "create", &image, "--name", "orc", "--wait"],
    );
    let created = Instant::now();
    assert_eq!(run(&["rc-status", "--runlevel"]).trim(), "default");
    let ls = alice.cli_ok(&service, &["m", "ls"]);
    assert!(ls.contains("running") && !ls.contains("booting"), "{ls}");
    eprintln!(
        "orc: created in {:.1?}, default runlevel {:.1?} later",
        created - started,
        created.elapsed()
    );

    // PID 1 is openrc-init, run through the /sbin/init link (hence its name).
    let init = run(&["--root", "readlink", "/proc/1/exe"]);
    assert!(init.trim().ends_with("/openrc-init"), "{init}");
    assert_eq!(run(&["ps", "-o", "args=", "-p", "1"]).trim(), "/sbin/init");
    // The runlevels ran without failures: cgroups in sysinit, sudo's LSB script in default.
    let status = run(&["rc-status", "--all"]);
    for (service_name, runlevel) in [("cgroups", "sysinit"), ("sudo", "default")] {
        let section = status
            .split("Runlevel: ")
            .find(|s| s.starts_with(runlevel))
            .unwrap_or_else(|| panic!("no {runlevel} runlevel in:\n{status}"));
        assert!(
            section
                .lines()
                .any(|l| l.trim_start().starts_with(service_name) && l.contains("started")),
            "{service_name} is not started in {runlevel}:\n{status}"
        );
    }
    assert_eq!(run(&["ls", "/run/openrc/failed"]).trim(), "", "{status}");

    // The machine user has passwordless sudo, and starts a service through OpenRC.
    run(&["sudo", "-n", "true"]);
    run(&["sudo", "-n", "rc-service", "stopmark", "start"]);
    let svc = run(&["rc-service", "stopmark", "status"]);
    assert!(svc.contains("started"), "{svc}");
    run(&["--root", "--no-shell", "sh", "-c", "echo kept > /var/kept"]);

    // `logs` shows OpenRC's own lines (its runlevels, a service it started), and not the
    // kernel's noise.
    let console = alice.cli_ok(&service, &["machine", "logs", "orc"]);
    for line in ["Starting sysinit runlevel", "Mounting cgroup filesystem"] {
        assert!(
            console.contains(line),
            "no `{line}` in the logs:\n{console}"
        );
    }
    assert!(!console.contains("PCI: Fatal"), "{console}");

    // openrc-init runs its shutdown (stopping the service) and the VM goes down by itself.
    stop_cleanly(&alice, &service, "orc");

    // What was written before the stop is there after it, the service's stop mark included:
    // OpenRC stopped it on the way down rather than the final kill.
    alice.cli_ok(&service, &["machine", "start", "orc"]);
    assert_eq!(run(&["cat", "/var/kept"]).trim(), "kept");
    let mark = run(&["cat", "/var/log/stopmark.stopped"]);
    assert!(mark.contains("stopped by openrc"), "{mark}");
    assert_eq!(
        run(&["--no-shell", "sh", "-c", WAIT_FOR_DEFAULT]).trim(),
        "default"
    );
    stop_cleanly(&alice, &service, "orc");
}

#[test]
fn a_stop_while_openrc_boots_is_clean() {
    if !require(is_root(), "the service runs as root") {
        return;
    }
    let registry = Registry::start();
    let image = registry.push(&test_image("openrc"), "tests/openrc:1");
    let service = Service::start(&config());
    let alice = TestUser::ensure("ctalice", 1500);
    let last_runlevel = |console: &str| {
        let before = console.split("stopping: signal").next().unwrap_or_default();
        before
            .lines()
            .rfind(|l| l.starts_with("Starting ") && l.ends_with(" runlevel"))
            .unwrap_or("none")
            .to_string()
    };

    // Right after create: openrc-init has only just started, OpenRC not yet running. The
    // agent sends the signal as soon as init catches it, which under emulation is often
    // before openrc-init has set its PATH (the kernel gives init none): its shutdown then
    // cannot find `openrc` ("exec: No such file or directory") and goes straight to the
    // final signals, with nothing started yet to stop.
    alice.cli_ok(&service, &["machine", "create", &image, "--name", "early"]);
    let console = stop_cleanly(&alice, &service, "early");
    eprintln!("early: stopped after {:?}", last_runlevel(&console));

    // Once OpenRC is in its sysinit runlevel (its init.sh writes the softlevel), well before
    // the default one is done under emulation: the shutdown runs beside the boot.
    alice.cli_ok(&service, &["machine", "start", "early"]);
    let seen = alice.cli_ok(
        &service,
        &[
            "machine",
            "run",
            "-n",
            "early",
            "--root",
            "--no-shell",
            "sh",
            "-c",
            "for i in $(seq 600); do [ -s /run/openrc/softlevel ] && break; sleep 0.1; done; \
             cat /run/openrc/softlevel; if [ -p /run/openrc/init.ctl ]; then echo finished; fi",
        ],
    );
    let console = stop_cleanly(&alice, &service, "early");
    eprintln!(
        "early: stopped after {:?} (OpenRC said {:?})",
        last_runlevel(&console),
        seen.trim()
    );

    // The interrupted boots left nothing behind that keeps the next one from finishing.
    let state = alice.cli_ok(
        &service,
        &[
            "machine",
            "run",
            "-n",
            "early",
            "--no-shell",
            "sh",
            "-c",
            WAIT_FOR_DEFAULT,
        ],
    );
    assert_eq!(state.trim(), "default");
    stop_cleanly(&alice, &service, "early");
}
