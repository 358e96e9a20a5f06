//! Installed as a user installs it: `scripts/install.sh` into a temporary prefix and data
//! directory (the binaries `scripts/build.sh` made, no rebuild), the systemd unit checked by
//! `systemd-analyze verify` and its ExecStart line run as the unit runs it (socket-activated
//! by `systemd-socket-activate`, umask 0077, no new privileges), Apple's
//! quickstart as a regular user, completions for bash, zsh and fish naming that user's
//! machine, a manual page, `system check`, a reinstall while the machine runs (the new
//! service adopts it), and an uninstall that leaves none of the files it installed.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use container_e2e::{
    Registry, TestUser, in_netns, install_bin, is_root, kernel_config, require, run_ok, test_image,
    workspace_root,
};

/// An install under a temporary directory: prefix, data directory and runtime directory.
struct Install {
    dir: tempfile::TempDir,
    prefix: PathBuf,
    root: PathBuf,
    run_dir: PathBuf,
    /// A service started here from the unit's ExecStart line, if still ours to stop.
    foreground: std::cell::RefCell<Option<Child>>,
}

impl Install {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("ct-install-")
            .tempdir_in("/tmp")
            .unwrap();
        // Users run the CLI and virtiofsd from the prefix: it must be reachable.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        Self {
            prefix: dir.path().join("prefix"),
            root: dir.path().join("root"),
            run_dir: dir.path().join("run"),
            dir,
            foreground: Default::default(),
        }
    }

    fn socket(&self) -> PathBuf {
        self.run_dir.join("apiserver.sock")
    }

    fn bin(&self, name: &str) -> PathBuf {
        self.prefix.join("bin").join(name)
    }

    /// `scripts/install.sh` (in the test's namespace: the service it starts boots machines).
    fn install(&self) -> String {
        let from = install_bin("container").parent().unwrap().to_path_buf();
        run_ok(
            in_netns(workspace_root().join("scripts/install.sh"))
                .env("CONTAINER_HOSTS_FILE", self.hosts_file())
                .arg("--prefix")
                .arg(&self.prefix)
                .arg("--root")
                .arg(&self.root)
                .arg("--run-dir")
                .arg(&self.run_dir)
                .arg("--from")
                .arg(from),
        )
    }

    /// Where this install's services keep machine names: never the host's /etc/hosts.
    fn hosts_file(&self) -> PathBuf {
        self.dir.path().join("hosts")
    }

    fn uninstall(&self, extra: &[&str]) -> Output {
        Command::new(workspace_root().join("scripts/uninstall.sh"))
            .env("CONTAINER_HOSTS_FILE", self.hosts_file())
            .arg("--prefix")
            .arg(&self.prefix)
            .args(extra)
            .output()
            .unwrap()
    }

    /// The installed `container`, aimed at this install's service.
    fn cli(&self, args: &[&str]) -> Command {
        let mut c = Command::new(self.bin("container"));
        c.args(args)
            .env("CONTAINER_SOCKET", self.socket())
            .env("CONTAINER_ROOT", &self.root)
            .env("CONTAINER_RUN_DIR", &self.run_dir)
            .env("CONTAINER_HOSTS_FILE", self.hosts_file())
            .stdin(Stdio::null());
        c
    }

    fn cli_ok(&self, args: &[&str]) -> String {
        run_ok(&mut self.cli(args))
    }

    /// The installed `container` as `user`, from `cwd`.
    fn user_cli(&self, user: &TestUser, cwd: &Path, args: &[&str]) -> Command {
        let mut c = self.cli(args);
        c.uid(user.uid)
            .gid(user.gid)
            .current_dir(cwd)
            .env("HOME", &user.home)
            .env("USER", &user.name);
        c
    }

    fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.cli_ok(&["system", "status", "--format", "json"])).unwrap()
    }

    fn manifest(&self) -> Vec<(String, PathBuf)> {
        let text =
            std::fs::read_to_string(self.prefix.join("share/container/install-manifest")).unwrap();
        text.lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(k, p)| (k.to_string(), PathBuf::from(p)))
            .collect()
    }

    fn wait_for_service(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self
            .cli(&["system", "status"])
            .output()
            .unwrap()
            .status
            .success()
        {
            assert!(Instant::now() < deadline, "the service did not answer");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Install {
    fn drop(&mut self) {
        // No machine or service outlives the test, whatever failed.
        if let Ok(out) = self.cli(&["machine", "ls", "-q"]).output() {
            for name in String::from_utf8_lossy(&out.stdout).lines() {
                let _ = self.cli(&["machine", "rm", "-f", name]).output();
            }
        }
        let _ = self.cli(&["system", "stop"]).output();
        if let Some(mut child) = self.foreground.get_mut().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = self.dir.path();
    }
}

/// The value of `Key=` in a unit file.
fn unit_value(unit: &str, key: &str) -> String {
    unit.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("the unit has no {key}="))
        .to_string()
}

/// What completing `container machine stop <Tab>` offers in `shell`, through the installed
/// completion script where the shell can be driven from a script (bash, fish), else through
/// the protocol the script speaks (zsh).
fn complete_machine_names(install: &Install, user: &TestUser, shell: &str) -> String {
    let share = install.prefix.join("share");
    let mut command = match shell {
        "bash" => {
            let mut c = Command::new("bash");
            c.arg("--norc").arg("-c").arg(format!(
                r#"source {}
COMP_WORDS=(container machine stop ""); COMP_CWORD=3; COMP_TYPE=9
COMP_LINE="container machine stop "; COMP_POINT=${{#COMP_LINE}}
_clap_complete_container container "" stop
printf '%s\n' "${{COMPREPLY[@]}}""#,
                share
                    .join("bash-completion/completions/container")
                    .display()
            ));
            c
        }
        "fish" => {
            let mut c = Command::new("fish");
            c.arg("--no-config").arg("-c").arg(format!(
                "source {}; complete -C 'container machine stop '",
                share
                    .join("fish/vendor_completions.d/container.fish")
                    .display()
            ));
            c
        }
        _ => {
            let mut c = Command::new(install.bin("container"));
            c.args(["--", "container", "machine", "stop", ""])
                .env("COMPLETE", "zsh")
                .env("_CLAP_COMPLETE_INDEX", "3")
                .env("_CLAP_IFS", "\n");
            c
        }
    };
    command
        .uid(user.uid)
        .gid(user.gid)
        .current_dir(&user.home)
        .env("HOME", &user.home)
        .env("CONTAINER_SOCKET", install.socket());
    run_ok(&mut command)
}

/// The guest's uptime in seconds: it only grows while the same VM runs.
fn uptime(install: &Install, user: &TestUser) -> f64 {
    let out = run_ok(&mut install.user_cli(
        user,
        &user.home,
        &["machine", "run", "-n", "qs", "cat", "/proc/uptime"],
    ));
    out.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn install_run_the_quickstart_upgrade_in_place_and_uninstall() {
    if !require(is_root(), "installing needs root") {
        return;
    }
    let have = |p: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {p}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    for tool in ["systemd-analyze", "zsh", "fish", "man", "setpriv"] {
        if !require(
            have(tool),
            &format!("{tool} (scripts/install-deps.sh installs it)"),
        ) {
            return;
        }
    }
    let layout = test_image("busybox");
    let install = Install::new();
    // The administrator's config (the test kernel), beside what install adds.
    let config = install.prefix.join("etc/container/config.toml");
    std::fs::create_dir_all(config.parent().unwrap()).unwrap();
    std::fs::write(&config, kernel_config()).unwrap();

    // Install: without systemd as init, it says so, how to start the service instead, and
    // starts it that way.
    let out = install.install();
    if !Path::new("/run/systemd/system").exists() {
        assert!(out.contains("could not enable"), "{out}");
        assert!(out.contains("sudo container system start"), "{out}");
    }
    assert!(
        install.status()["run_by"]
            .as_str()
            .unwrap()
            .starts_with("the CLI")
    );
    for file in [
        "bin/container",
        "bin/container-apiserver",
        "bin/container-agent",
        "lib/systemd/system/container-apiserver.service",
        "lib/systemd/system/container-apiserver.socket",
        "share/bash-completion/completions/container",
        "share/zsh/site-functions/_container",
        "share/fish/vendor_completions.d/container.fish",
        "share/man/man1/container.1",
        "share/man/man1/container-machine-create.1",
    ] {
        assert!(install.prefix.join(file).is_file(), "{file} is installed");
    }

    // The unit passes systemd's own check (its man pages found in the prefix).
    let units = install.prefix.join("lib/systemd/system");
    let service_unit = units.join("container-apiserver.service");
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&service_unit)
        .arg(units.join("container-apiserver.socket"))
        .env("MANPATH", install.prefix.join("share/man"))
        .output()
        .unwrap();
    let complaints = String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success(),
        "systemd-analyze verify: {complaints}"
    );
    assert!(
        !complaints.contains("container-apiserver"),
        "systemd-analyze verify complains: {complaints}"
    );

    // Its ExecStart line, run as the unit runs it: socket-activated (the first command
    // starts it), a clean environment, umask 0077, no new privileges.
    let unit = std::fs::read_to_string(&service_unit).unwrap();
    let exec_start = unit_value(&unit, "ExecStart");
    assert_eq!(unit_value(&unit, "UMask"), "0077");
    assert_eq!(unit_value(&unit, "NoNewPrivileges"), "yes");
    assert!(exec_start.contains(&install.socket().display().to_string()));
    assert_eq!(
        unit_value(
            &std::fs::read_to_string(units.join("container-apiserver.socket")).unwrap(),
            "ListenStream"
        ),
        install.socket().display().to_string()
    );
    install.cli_ok(&["system", "stop"]);
    let log = std::fs::File::create(install.dir.path().join("execstart.log")).unwrap();
    let child = in_netns("systemd-socket-activate")
        .arg("--listen")
        .arg(install.socket())
        .arg("--setenv=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .arg(format!(
            "--setenv=CONTAINER_HOSTS_FILE={}",
            install.hosts_file().display()
        ))
        .args(["setpriv", "--no-new-privs", "--", "sh", "-c"])
        .arg(format!("umask 0077 && exec {exec_start}"))
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .process_group(0)
        .spawn()
        .unwrap();
    install.foreground.replace(Some(child));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !install.socket().exists() {
        assert!(Instant::now() < deadline, "nothing listens on the socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    // What SocketMode=0666 does: every user may connect.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(install.socket(), std::fs::Permissions::from_mode(0o666)).unwrap();
    install.wait_for_service();
    let run_by = install.status()["run_by"].as_str().unwrap().to_string();
    assert!(run_by.starts_with("socket activation"), "{run_by}");

    // Apple's quickstart, as a regular user from a directory in their home.
    let user = TestUser::ensure("ctinstall", 1502);
    let project = user.home.join("project");
    std::fs::create_dir_all(&project).unwrap();
    nix::unistd::chown(&project, Some(user.uid.into()), Some(user.gid.into())).unwrap();
    let registry = Registry::start();
    let reference = registry.push(&layout, "tests/busybox:latest");
    let as_user = |args: &[&str]| run_ok(&mut install.user_cli(&user, &project, args));
    as_user(&["machine", "create", &reference, "--name", "qs"]);
    assert_eq!(
        as_user(&["machine", "run", "-n", "qs", "whoami"]).trim(),
        user.name
    );
    assert_eq!(
        as_user(&["machine", "run", "-n", "qs", "pwd"]).trim(),
        project.display().to_string()
    );

    // Completions in each shell name the user's machine; the manual page renders.
    for shell in ["bash", "zsh", "fish"] {
        let offered = complete_machine_names(&install, &user, shell);
        assert!(
            offered
                .lines()
                .any(|l| l.split_whitespace().next() == Some("qs")),
            "{shell} completion offers the machine qs: {offered:?}"
        );
    }
    let man = run_ok(
        Command::new("man")
            .arg("-l")
            .arg(
                install
                    .prefix
                    .join("share/man/man1/container-machine-create.1"),
            )
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "100"),
    );
    assert!(man.contains("container-machine-create"), "{man}");
    assert!(man.contains("--name"), "{man}");

    // The host check, as the user: machines can run here, and it says how.
    let check = as_user(&["system", "check"]);
    for line in [
        "ok    qemu ",
        "ok    virtiofsd ",
        "ok    kernel ",
        "service ",
        "kvm ",
    ] {
        assert!(
            check.contains(line),
            "system check shows {line:?}:\n{check}"
        );
    }
    let report: serde_json::Value =
        serde_json::from_str(&as_user(&["system", "check", "--format", "json"])).unwrap();
    assert_eq!(report["machines_can_run"], true, "{report}");

    // Reinstall while the machine runs: the new service adopts the running VM (its uptime
    // goes on, nothing rebooted) and runs commands in it.
    let before = uptime(&install, &user);
    let old_pid = install.status()["pid"].clone();
    let out = install.install();
    let previous = install.foreground.take();
    if let Some(mut child) = previous {
        // install.sh stopped it to start the new binary.
        let status = child.wait().unwrap();
        assert!(
            status.success(),
            "the old service stopped cleanly: {status}\n{out}"
        );
    }
    let status = install.status();
    assert_ne!(status["pid"], old_pid, "a new service runs");
    assert_eq!(status["machines_running"], 1, "{status}");
    let after = uptime(&install, &user);
    assert!(
        after > before,
        "the same VM runs on ({before} s, then {after} s)"
    );

    // Uninstall refuses while a machine runs, then removes every file it installed and
    // keeps the data directory and the administrator's config.
    let refused = install.uninstall(&[]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("machines are running"));
    as_user(&["machine", "stop", "qs"]);
    let manifest = install.manifest();
    let names = std::fs::read_to_string(install.hosts_file()).unwrap_or_default();
    assert!(names.contains("\tqs.machine\n"), "hosts file: {names}");
    let out = install.uninstall(&[]);
    assert!(
        out.status.success(),
        "uninstall: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let names = std::fs::read_to_string(install.hosts_file()).unwrap_or_default();
    assert!(!names.contains("container machines"), "hosts file: {names}");
    for (kind, path) in &manifest {
        match kind.as_str() {
            "file" => assert!(!path.exists(), "{} was removed", path.display()),
            "dir" if !config.starts_with(path) => {
                assert!(!path.exists(), "{} was removed", path.display())
            }
            _ => {}
        }
    }
    assert!(config.is_file(), "the administrator's config stays");
    assert!(install.root.join("machines/qs").is_dir(), "the data stays");
    assert!(
        !install
            .cli(&["system", "status"])
            .output()
            .is_ok_and(|o| o.status.success()),
        "no service runs"
    );
}
