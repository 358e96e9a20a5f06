//! SSH agent forwarding end to end: a real `ssh-agent` on the host holding a generated key,
//! `ssh-add -l` inside the machine listing it (in a `run` and in a login shell), nothing
//! forwarded without `SSH_AUTH_SOCK`, and another user naming the first one's agent socket
//! getting nothing from it.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use container_e2e::{Registry, Service, TestUser, is_root, kernel_config, require, run_ok};

fn config() -> String {
    format!("[machine]\ncpus = 2\nmemory = \"1G\"\n{}", kernel_config())
}

/// An `ssh-agent` of `user`'s, killed (by its pid) when dropped.
struct HostAgent {
    socket: PathBuf,
    pid: i32,
}

impl HostAgent {
    fn start(user: &TestUser) -> Self {
        let out = run_ok(as_user(user, "ssh-agent").arg("-s"));
        let value = |key: &str| {
            out.split(';')
                .find_map(|part| part.trim().strip_prefix(&format!("{key}=")))
                .unwrap_or_else(|| panic!("no {key} in {out}"))
                .to_string()
        };
        HostAgent {
            socket: PathBuf::from(value("SSH_AUTH_SOCK")),
            pid: value("SSH_AGENT_PID").parse().unwrap(),
        }
    }
}

impl Drop for HostAgent {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid),
            nix::sys::signal::SIGTERM,
        );
    }
}

/// `program` run as `user` (with their groups), from their home.
fn as_user(user: &TestUser, program: &str) -> Command {
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={}", user.uid))
        .arg(format!("--regid={}", user.gid))
        .arg("--init-groups")
        .arg(program)
        .env("HOME", &user.home)
        .current_dir(&user.home);
    c
}

/// `container machine run -n NAME ARGS` as `user`, with `SSH_AUTH_SOCK` set to `agent`.
fn run_with_agent(
    service: &Service,
    user: &TestUser,
    agent: Option<&Path>,
    name: &str,
    args: &[&str],
) -> Output {
    let mut full = vec!["machine", "run", "-n", name];
    full.extend_from_slice(args);
    let mut c = user.command(service, &user.home, &full);
    if let Some(agent) = agent {
        c.env("SSH_AUTH_SOCK", agent);
    }
    c.output().expect("run container")
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn the_callers_agent_is_forwarded_and_no_one_elses() {
    if !require(is_root(), "the service runs as root") {
        return;
    }
    let registry = Registry::start();
    // The sshd image has openssh-client, so ssh-add, in the machine.
    let image = registry.push(&container_e2e::test_image("sshd"), "tests/sshd:12");
    let service = Service::start(&config());
    let alice = TestUser::ensure("ctalice", 1500);
    let bob = TestUser::ensure("ctbob", 1501);

    // Alice's agent, with a key made for this test.
    let agent = HostAgent::start(&alice);
    let key = alice
        .home
        .join(format!("ct-agent-key-{}", std::process::id()));
    let _ = std::fs::remove_file(&key);
    let _ = std::fs::remove_file(key.with_extension("pub"));
    run_ok(as_user(&alice, "ssh-keygen").args([
        "-q",
        "-t",
        "ed25519",
        "-N",
        "",
        "-C",
        "ct-e2e-key",
        "-f",
        &key.display().to_string(),
    ]));
    run_ok(
        as_user(&alice, "ssh-add")
            .env("SSH_AUTH_SOCK", &agent.socket)
            .arg(&key),
    );
    let fingerprint = run_ok(as_user(&alice, "ssh-keygen").arg("-lf").arg(&key))
        .split_whitespace()
        .nth(1)
        .expect("a fingerprint")
        .to_string();
    assert!(fingerprint.starts_with("SHA256:"), "{fingerprint}");

    alice.cli_ok(&service, &["machine", "create", &image, "--name", "am"]);
    bob.cli_ok(&service, &["machine", "create", &image, "--name", "bm"]);

    // A run lists the host agent's key, through the socket Apple's machines have.
    let out = run_with_agent(
        &service,
        &alice,
        Some(&agent.socket),
        "am",
        &["echo $SSH_AUTH_SOCK; stat -c '%U %a' /var/host-services/ssh-auth.sock; ssh-add -l"],
    );
    let got = text(&out);
    assert!(out.status.success(), "{got}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("/var/host-services/ssh-auth.sock\nctalice 600\n"),
        "{got}"
    );
    assert!(
        stdout.contains(&fingerprint) && stdout.contains("ct-e2e-key"),
        "{got}"
    );

    // So does a login shell (fed from stdin, no terminal).
    let mut login = alice.command(&service, &alice.home, &["machine", "run", "-n", "am", "-i"]);
    login
        .env("SSH_AUTH_SOCK", &agent.socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = login.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"echo login=$0 sock=$SSH_AUTH_SOCK\nssh-add -l\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let got = text(&out);
    assert!(out.status.success(), "{got}");
    assert!(
        got.contains("login=-") && got.contains("sock=/var/host-services/ssh-auth.sock"),
        "{got}"
    );
    assert!(got.contains(&fingerprint), "{got}");

    // Without SSH_AUTH_SOCK nothing is forwarded, and the socket is gone with the sessions
    // that had it.
    let out = run_with_agent(
        &service,
        &alice,
        None,
        "am",
        &[
            "echo ${SSH_AUTH_SOCK:-unset}; [ -e /var/host-services/ssh-auth.sock ] && echo present || echo absent",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "unset\nabsent\n",
        "{}",
        text(&out)
    );

    // Bob names Alice's agent socket: the service connects to it as Bob, who may not enter
    // her private directory, so his machine gets nothing from it: the agent refuses.
    let stolen = run_with_agent(&service, &bob, Some(&agent.socket), "bm", &["ssh-add -l"]);
    let got = text(&stolen);
    assert!(!stolen.status.success(), "{got}");
    assert!(!got.contains(&fingerprint), "{got}");
    assert!(got.contains("agent refused operation"), "{got}");
    // Even when she leaves it open to everyone, it is not his: still nothing.
    let dir = agent.socket.parent().unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(&agent.socket, std::fs::Permissions::from_mode(0o777)).unwrap();
    let stolen = run_with_agent(&service, &bob, Some(&agent.socket), "bm", &["ssh-add -l"]);
    let got = text(&stolen);
    assert!(!stolen.status.success(), "{got}");
    assert!(!got.contains(&fingerprint), "{got}");
    assert!(
        service
            .log()
            .contains("SSH agent connection from a machine refused"),
        "{}",
        container_e2e::tail(&service.log(), 30)
    );
    // Her own runs still work.
    let out = run_with_agent(&service, &alice, Some(&agent.socket), "am", &["ssh-add -l"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&fingerprint),
        "{}",
        text(&out)
    );

    let _ = std::fs::remove_file(&key);
    let _ = std::fs::remove_file(key.with_extension("pub"));
}
