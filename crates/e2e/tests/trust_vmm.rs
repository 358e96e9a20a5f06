//! The VMM's confinement end to end: a user's machine boots, shares the home, reaches the
//! network, survives a service restart and stops, while its QEMU and vhost-device-vsock run
//! as the VM's own uid (not root, not the owner), without the service's environment, and
//! with credentials that read neither the machine's disk by name, nor the image store, nor
//! root's home.

use std::path::{Path, PathBuf};
use std::process::Command;

use container_e2e::{
    HOSTILE_ENV, Registry, Service, TestUser, is_root, kernel_config, require, test_image,
};

fn config() -> String {
    format!(
        "[machine]\ncpus = 1\nmemory = \"512M\"\n{}",
        kernel_config()
    )
}

/// The run.json of the machine `name` (the test runs as root, which may read it).
fn run_state(root: &Path, name: &str) -> serde_json::Value {
    fn find(dir: &Path, name: &str) -> Option<serde_json::Value> {
        for entry in std::fs::read_dir(dir).ok()?.flatten() {
            let path = entry.path();
            if path.is_dir() {
                if let Some(v) = find(&path, name) {
                    return Some(v);
                }
            } else if path.file_name().is_some_and(|n| n == "run.json") {
                let v: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
                if v["id"] == name {
                    return Some(v);
                }
            }
        }
        None
    }
    find(&root.join("machines"), name).expect("run.json of the running machine")
}

fn ps_uid(pid: i64) -> u32 {
    let out = Command::new("ps")
        .args(["-o", "uid=", "-p", &pid.to_string()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// `head -c 1 path` with the credentials QEMU runs with; its stderr, if it failed.
fn read_as(uid: u32, path: &Path) -> Result<(), String> {
    let out = Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .args(["--clear-groups", "--no-new-privs", "head", "-c", "1"])
        .arg(path)
        .output()
        .unwrap();
    match out.status.success() {
        true => Ok(()),
        false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
    }
}

#[test]
fn a_machines_vmm_runs_as_its_own_user_and_reads_nothing_else() {
    if !require(is_root(), "the service runs as root") {
        return;
    }
    let registry = Registry::start();
    let image = registry.push(&test_image("busybox"), "tests/busybox:1");
    let service = Service::start(&config());
    let alice = TestUser::ensure("ctvmm", 1530);

    alice.cli_ok(&service, &["machine", "create", &image, "--name", "dev"]);
    let run = run_state(&service.root, "dev");
    let uid = run["uid"].as_u64().unwrap() as u32;
    let qemu = run["qemu"][0].as_i64().unwrap();
    let vsock = run["helpers"][0][0].as_i64().unwrap();
    let virtiofsd = run["helpers"][1][0].as_i64().unwrap();
    assert_ne!(uid, 0);
    assert_ne!(uid, alice.uid);
    assert_eq!(ps_uid(qemu), uid, "QEMU");
    assert_eq!(ps_uid(vsock), uid, "vhost-device-vsock");
    assert_eq!(
        ps_uid(virtiofsd),
        alice.uid,
        "virtiofsd serves the home as its owner"
    );

    // The service runs with a variable QEMU would obey; QEMU does not have it.
    let environ = std::fs::read(format!("/proc/{qemu}/environ")).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    assert!(!environ.contains(HOSTILE_ENV.0), "{environ}");
    let service_pid = Command::new("pgrep")
        .args([
            "-f",
            &format!("container-apiserver --root {}", service.root.display()),
        ])
        .output()
        .unwrap();
    let service_pid = String::from_utf8_lossy(&service_pid.stdout);
    let service_env = std::fs::read(format!("/proc/{}/environ", service_pid.trim())).unwrap();
    assert!(String::from_utf8_lossy(&service_env).contains(HOSTILE_ENV.0));

    // A guest that took QEMU over has its credentials, and they reach nothing.
    for path in [
        service.root.join("images"),
        service.root.join("machines"),
        PathBuf::from("/root"),
    ] {
        let err = read_as(uid, &path).expect_err("the VM's user reads nothing of others");
        assert!(
            err.contains("Permission denied"),
            "{}: {err}",
            path.display()
        );
    }

    // The machine works as before: home shared, network up.
    let file = alice.home.join("from-the-vm");
    alice.cli_ok(
        &service,
        &[
            "machine",
            "run",
            "-n",
            "dev",
            "touch",
            &file.display().to_string(),
        ],
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&file).unwrap().uid(), alice.uid);
    alice.cli_ok(
        &service,
        &[
            "machine",
            "run",
            "-n",
            "dev",
            "--root",
            "ping",
            "-c",
            "1",
            "-W",
            "5",
            "192.168.64.1",
        ],
    );

    // Adopted after a service restart, under the same user; then stopped.
    service.stop_service();
    service.launch();
    assert_eq!(ps_uid(qemu), uid);
    assert_eq!(
        alice
            .cli_ok(
                &service,
                &["machine", "run", "-n", "dev", "echo", "adopted"]
            )
            .trim(),
        "adopted"
    );
    alice.cli_ok(&service, &["machine", "stop", "dev"]);
    // Gone, or a zombie its new parent has not reaped yet (it was the first service's child).
    let state = std::fs::read_to_string(format!("/proc/{qemu}/stat")).unwrap_or_default();
    let state = state.rsplit(')').next().unwrap_or_default().trim_start();
    assert!(
        state.is_empty() || state.starts_with('Z'),
        "QEMU is gone: {state}"
    );
}
