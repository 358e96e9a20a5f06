//! Image commands end to end: a real registry on loopback, images pushed with skopeo, pulled
//! with `container image pull`, and the resulting base disk read back with debugfs.

use std::path::Path;
use std::process::Command;

use container_e2e::{Registry, Service, Throttle, is_root, require, run_ok, test_image};

fn debugfs(disk: &Path, request: &str) -> String {
    run_ok(Command::new("debugfs").arg("-R").arg(request).arg(disk))
}

fn inspect(service: &Service, reference: &str) -> serde_json::Value {
    let out = service.cli_ok(&["image", "inspect", reference]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("inspect prints JSON");
    v[0].clone()
}

#[test]
fn pull_inspect_tag_save_load_and_remove() {
    if !require(is_root(), "the service runs as root") {
        return;
    }
    let registry = Registry::start();
    let busybox = registry.push(&test_image("busybox"), "tests/busybox:1");
    let service = Service::start("");

    let out = service.cli_ok(&["image", "pull", &busybox]);
    assert!(out.contains(&busybox), "{out}");

    let ls = service.cli_ok(&["image", "ls"]);
    assert!(ls.lines().next().unwrap().starts_with("NAME"), "{ls}");
    assert!(ls.contains("tests/busybox"), "{ls}");
    let json: serde_json::Value =
        serde_json::from_str(&service.cli_ok(&["image", "ls", "--format", "json"])).unwrap();
    assert_eq!(json[0]["reference"], busybox.as_str());
    let quiet = service.cli_ok(&["image", "ls", "-q"]);
    assert_eq!(quiet.trim(), busybox);

    let detail = inspect(&service, &busybox);
    assert_eq!(detail["has_init"], true, "{detail}");
    assert_eq!(detail["architecture"], "amd64");
    let disk = detail["base_disk"]["path"]
        .as_str()
        .expect("a base disk")
        .to_string();
    let stat = debugfs(Path::new(&disk), "stat /bin/busybox");
    assert!(stat.contains("Type: regular"), "{stat}");
    let passwd = debugfs(Path::new(&disk), "cat /etc/passwd");
    assert!(passwd.starts_with("root:x:0:0"), "{passwd}");

    // A second pull fetches nothing.
    let again = service.cli(&["image", "pull", &busybox]);
    assert!(again.status.success());
    let log = String::from_utf8_lossy(&again.stderr);
    assert!(!log.contains(" done"), "blobs were fetched again: {log}");

    service.cli_ok(&["image", "tag", &busybox, "local/busybox:copy"]);
    assert!(
        service
            .cli_ok(&["image", "ls", "-q"])
            .contains("local/busybox:copy")
    );

    let archive = service.dir.path().join("busybox.tar");
    service.cli_ok(&["image", "save", &busybox, "-o", archive.to_str().unwrap()]);
    run_ok(Command::new("skopeo").args(["inspect", &format!("oci-archive:{}", archive.display())]));

    service.cli_ok(&["image", "rm", &busybox, "local/busybox:copy"]);
    assert_eq!(service.cli_ok(&["image", "ls", "-q"]).trim(), "");
    let blobs = service.root.join("images");
    let leftover = run_ok(
        Command::new("find")
            .arg(&blobs)
            .args(["-type", "f", "-size", "+100k"]),
    );
    assert_eq!(leftover.trim(), "", "image rm left large files behind");

    let loaded = service.cli_ok(&["image", "load", "-i", archive.to_str().unwrap()]);
    assert!(loaded.contains("busybox"), "{loaded}");
    assert_eq!(inspect(&service, &busybox)["has_init"], true);
}

#[test]
fn images_without_init_are_reported() {
    if !require(is_root(), "the service runs as root") {
        return;
    }
    let registry = Registry::start();
    let noinit = registry.push(&test_image("noinit"), "tests/noinit:1");
    let service = Service::start("");
    service.cli_ok(&["image", "pull", "-q", &noinit]);
    assert_eq!(inspect(&service, &noinit)["has_init"], false);
}

#[test]
fn prune_all_removes_the_images_no_machine_uses_and_frees_what_system_df_foretold() {
    if !require(is_root(), "the service runs as root") {
        return;
    }
    let registry = Registry::start();
    let busybox = registry.push(&test_image("busybox"), "tests/busybox:1");
    let noinit = registry.push(&test_image("noinit"), "tests/noinit:1");
    let service = Service::start("");
    service.cli_ok(&["image", "pull", "-q", &busybox]);
    service.cli_ok(&["image", "pull", "-q", &noinit]);
    service.cli_ok(&[
        "machine",
        "create",
        &busybox,
        "--name",
        "keep",
        "--no-boot",
        "--network",
        "none",
        "--home-mount",
        "none",
    ]);
    let stored = || {
        run_ok(
            Command::new("du")
                .args(["-sb"])
                .arg(service.root.join("images")),
        )
        .split_whitespace()
        .next()
        .unwrap()
        .parse::<u64>()
        .unwrap()
    };
    let before = stored();
    let df = || -> serde_json::Value {
        serde_json::from_str(&service.cli_ok(&["system", "df", "--format", "json"])).unwrap()
    };
    let usage = df();
    let images = &usage["images"];
    assert_eq!(
        (&images["total"], &images["active"]),
        (&2.into(), &1.into()),
        "{usage}"
    );
    let foretold = images["reclaimable"].as_u64().unwrap();
    assert!(
        foretold > 0 && images["size"].as_u64().unwrap() > foretold,
        "{usage}"
    );
    let machines = &usage["machines"];
    assert_eq!(
        (&machines["total"], &machines["active"]),
        (&1.into(), &0.into()),
        "{usage}"
    );
    assert_eq!(
        machines["reclaimable"], machines["size"],
        "a stopped machine: {usage}"
    );
    let table = service.cli_ok(&["system", "df"]);
    let lines: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines[0],
        ["TYPE", "TOTAL", "ACTIVE", "SIZE", "RECLAIMABLE"],
        "{table}"
    );
    assert_eq!(lines[1][..3], ["Images", "2", "1"], "{table}");
    assert_eq!(lines[2][..3], ["Machines", "1", "0"], "{table}");

    // Without --all nothing goes: no image here lacks a name.
    let out = service.cli_ok(&["image", "prune"]);
    assert_eq!(out.trim(), "Reclaimed 0B of disk space");
    assert_eq!(service.cli_ok(&["image", "ls", "-q"]).lines().count(), 2);

    let report: serde_json::Value =
        serde_json::from_str(&service.cli_ok(&["image", "prune", "--all", "--format", "json"]))
            .unwrap();
    assert_eq!(report["untagged"], serde_json::json!([noinit]), "{report}");
    let freed = report["freed_bytes"].as_u64().unwrap();
    assert_eq!(freed, foretold, "{report}");
    assert_eq!(service.cli_ok(&["image", "ls", "-q"]).trim(), busybox);
    let after = stored();
    assert!(
        before - after >= freed / 2,
        "the store shrank by {} bytes, the report says {freed}",
        before - after
    );
    // The machine's image stays, and a second prune finds nothing more.
    let again = service.cli_ok(&["image", "prune", "--all"]);
    assert_eq!(again.trim(), "Reclaimed 0B of disk space");
    let images = df()["images"].clone();
    assert_eq!(
        (&images["total"], &images["reclaimable"]),
        (&1.into(), &0.into()),
        "{images}"
    );
}

#[test]
fn bad_references_and_missing_images_fail_clearly() {
    if !require(is_root(), "the service runs as root") {
        return;
    }
    let registry = Registry::start();
    let service = Service::start("");
    let missing = format!("{}/tests/absent:1", registry.addr);
    // Each with the exit code `container --help` gives it.
    let fails = |args: &[&str], code: i32| {
        let out = service.cli(args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        err
    };
    let err = fails(&["image", "pull", &missing], 3);
    assert!(err.contains("absent"), "{err}");
    let err = fails(&["image", "inspect", "nothing/here:1"], 3);
    assert!(err.to_lowercase().contains("not found"), "{err}");
    let err = fails(&["image", "pull", "UPPER/Case::bad"], 2);
    assert!(err.to_lowercase().contains("invalid"), "{err}");
    assert_eq!(service.cli_ok(&["image", "ls", "-q"]).trim(), "");
}

#[test]
fn a_corrupted_blob_is_refused_and_nothing_is_recorded() {
    if !require(is_root(), "the service runs as root") {
        return;
    }
    let registry = Registry::start();
    let reference = registry.push(&test_image("busybox"), "tests/corrupt:1");
    // Corrupt every large blob the registry stores, keeping its size.
    let data = registry.storage_dir();
    let blobs = run_ok(
        Command::new("find")
            .arg(&data)
            .args(["-name", "data", "-size", "+100k"]),
    );
    assert!(
        !blobs.trim().is_empty(),
        "no layer blob found under {}",
        data.display()
    );
    for blob in blobs.lines() {
        let mut bytes = std::fs::read(blob).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        std::fs::write(blob, bytes).unwrap();
    }
    let service = Service::start("");
    let err = service.cli_err(&["image", "pull", &reference]);
    assert!(err.contains("digest"), "{err}");
    assert_eq!(service.cli_ok(&["image", "ls", "-q"]).trim(), "");
    // The next pull, once the registry is healthy again, is not blocked by debris.
}

#[test]
fn basic_auth_registry_needs_login() {
    if !require(is_root(), "the service runs as root") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    run_ok(
        Command::new("htpasswd")
            .args(["-Bbc"])
            .arg(&htpasswd)
            .args(["alice", "s3cret"]),
    );
    let registry = Registry::start_with(&["--htpasswd", htpasswd.to_str().unwrap()]);
    let reference =
        registry.push_with_auth(&test_image("busybox"), "tests/private:1", "alice:s3cret");
    let service = Service::start("");
    let err = service.cli_err(&["image", "pull", &reference]);
    assert!(
        err.contains("registry login") || err.to_lowercase().contains("auth"),
        "{err}"
    );

    let mut login = service.command(&[
        "registry",
        "login",
        &registry.addr,
        "-u",
        "alice",
        "--password-stdin",
    ]);
    login.stdin(std::process::Stdio::piped());
    let mut child = login.spawn().unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"wrong\n").unwrap();
    assert!(
        !child.wait().unwrap().success(),
        "a wrong password was accepted"
    );

    let mut login = service.command(&[
        "registry",
        "login",
        &registry.addr,
        "-u",
        "alice",
        "--password-stdin",
    ]);
    login.stdin(std::process::Stdio::piped());
    let mut child = login.spawn().unwrap();
    child.stdin.take().unwrap().write_all(b"s3cret\n").unwrap();
    assert!(child.wait().unwrap().success());
    service.cli_ok(&["image", "pull", "-q", &reference]);
    service.cli_ok(&["registry", "logout", &registry.addr]);
}

/// `container registry login SERVER -u USER --password-stdin`; whether it succeeded.
fn login(service: &Service, server: &str, user: &str, password: &str) -> bool {
    use std::io::Write;
    let mut login = service.command(&["registry", "login", server, "-u", user, "--password-stdin"]);
    login.stdin(std::process::Stdio::piped());
    let mut child = login.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{password}\n").as_bytes())
        .unwrap();
    child.wait().unwrap().success()
}

#[test]
fn token_auth_registries_pull_anonymously_or_after_login() {
    if !require(is_root(), "the service runs as root") {
        return;
    }
    let busybox = test_image("busybox");
    let service = Service::start("");

    // A public registry: the challenge's realm hands out pull tokens to anyone.
    let public = Registry::start_with(&["--token"]);
    let reference = public.push(&busybox, "tests/public:1");
    service.cli_ok(&["image", "pull", "-q", &reference]);
    assert_eq!(inspect(&service, &reference)["has_init"], true);
    assert!(
        public
            .token_log()
            .contains("token for 'anonymous': repository:tests/public:pull\n"),
        "the pull did not use the token realm:\n{}",
        public.token_log()
    );

    // A private one: tokens that grant anything need a login.
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    run_ok(
        Command::new("htpasswd")
            .args(["-Bbc"])
            .arg(&htpasswd)
            .args(["alice", "s3cret"]),
    );
    let private = Registry::start_with(&["--token", "--htpasswd", htpasswd.to_str().unwrap()]);
    // skopeo pushes through the same token server, as alice.
    let reference = private.push_with_auth(&busybox, "tests/private:1", "alice:s3cret");
    let err = service.cli_err(&["image", "pull", &reference]);
    assert!(
        err.contains(&format!("container registry login {}", private.addr)),
        "the error does not say how to log in: {err}"
    );
    assert!(
        !service.cli_ok(&["image", "ls", "-q"]).contains("private"),
        "a refused pull recorded an image"
    );
    assert!(
        !login(&service, &private.addr, "alice", "wrong"),
        "a wrong password was accepted"
    );
    assert!(login(&service, &private.addr, "alice", "s3cret"));
    service.cli_ok(&["image", "pull", "-q", &reference]);
    assert_eq!(inspect(&service, &reference)["has_init"], true);
    assert!(
        private
            .token_log()
            .contains("token for 'alice': repository:tests/private:pull\n"),
        "{}",
        private.token_log()
    );
}

/// Files directly in `dir` with their sizes (none when it does not exist).
fn files(dir: &Path) -> Vec<(String, u64)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| {
                    let size = e.metadata().map(|m| m.len()).unwrap_or(0);
                    (e.file_name().to_string_lossy().into_owned(), size)
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Fails unless every blob in the store is whole: its content hashes to its name.
fn assert_blobs_whole(store: &Path) {
    let blobs = store.join("blobs/sha256");
    for (name, _) in files(&blobs) {
        let out = run_ok(Command::new("sha256sum").arg(blobs.join(&name)));
        let actual = out.split_whitespace().next().unwrap_or_default();
        assert_eq!(actual, name, "blob {name} is not whole");
    }
}

/// The size of the largest layer of the `latest` image of an OCI layout.
fn largest_layer(layout: &Path) -> u64 {
    let read = |hex: &str| -> serde_json::Value {
        let path = layout.join("blobs/sha256").join(hex);
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    };
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let digest = index["manifests"][0]["digest"].as_str().unwrap();
    let manifest = read(digest.trim_start_matches("sha256:"));
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["size"].as_u64().unwrap())
        .max()
        .unwrap()
}

#[test]
fn a_pull_killed_mid_download_leaves_no_image_and_the_next_completes() {
    if !require(is_root(), "the service runs as root") {
        return;
    }
    let layout = test_image("debian");
    let layer_size = largest_layer(&layout);
    assert!(
        layer_size > 32 << 20,
        "the debian layer is only {layer_size} bytes"
    );
    let registry = Registry::start();
    let direct = registry.push(&layout, "tests/debian:1");
    // 4 MiB/s: the layer takes many seconds, so the kill lands mid-transfer.
    let throttle = Throttle::start(&registry.addr, 4 << 20);
    let reference = direct.replacen(&registry.addr, &throttle.addr, 1);
    let service = Service::start("");
    let store = service.root.join("images");
    let ingest = store.join("ingest");

    let mut pull = service
        .command(&["image", "pull", &reference])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let (mut pipe, stderr) = (pull.stderr.take().unwrap(), stderr.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = std::io::Read::read(&mut pipe, &mut buf) {
                if n == 0 {
                    break;
                }
                stderr
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    // Wait for the progress line and for the layer to be part-way into the ingest area.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let resolved = stderr.lock().unwrap().contains("resolved");
        if resolved && files(&ingest).iter().any(|(_, size)| *size >= 4 << 20) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the download did not start: {}\n{}",
            stderr.lock().unwrap(),
            container_e2e::tail(&service.log(), 30)
        );
        assert!(
            pull.try_wait().unwrap().is_none(),
            "the pull ended before it could be killed: {}",
            stderr.lock().unwrap()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    service.kill_service();
    let status = pull.wait().unwrap();
    reader.join().unwrap();
    assert!(
        !status.success(),
        "the pull claims success after its service was killed"
    );
    let partial = files(&ingest);
    assert!(
        partial.iter().any(|(_, size)| *size < layer_size),
        "no partial layer in the ingest area: {partial:?}"
    );
    // Whatever the kill left, nothing half-written is outside the ingest area.
    assert_blobs_whole(&store);
    assert!(
        files(&store.join("blobs/sha256"))
            .iter()
            .all(|(_, size)| *size != layer_size),
        "the layer was complete: the kill came too late"
    );

    service.launch();
    assert_eq!(service.cli_ok(&["image", "ls", "-q"]).trim(), "");
    assert!(
        files(&ingest).is_empty(),
        "the restart left {:?}",
        files(&ingest)
    );
    assert!(
        files(&store.join("disks")).is_empty(),
        "a base disk remains"
    );
    assert!(files(&store.join("work")).is_empty(), "staging remains");
    assert_blobs_whole(&store);

    throttle.set_rate(0);
    service.cli_ok(&["image", "pull", "-q", &reference]);
    let detail = inspect(&service, &reference);
    assert_eq!(detail["has_init"], true, "{detail}");
    assert_blobs_whole(&store);
}

/// A tmpfs mounted for one test, detached on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Self {
        nix::mount::mount(
            Some("tmpfs"),
            at,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={size}").as_str()),
        )
        .unwrap_or_else(|e| panic!("mounting a tmpfs on {}: {e}", at.display()));
        Self(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// An OCI layout (tag `latest`) of an image whose only layer is a gzip bomb: a tar of one
/// file of `size` zero bytes (a multiple of 1 MiB), as concatenated gzip members (which gzip
/// readers take as one stream), a kilobyte per MiB. Its diff_id is made up, as a hostile
/// image's would be: nothing on this path checks it.
fn gzip_bomb_layout(dir: &Path, size: u64) -> std::path::PathBuf {
    use std::io::Write;
    let gzip = |bytes: &[u8]| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    };
    let mut header = tar::Header::new_ustar();
    header.set_path("zeros").unwrap();
    header.set_mode(0o644);
    header.set_size(size);
    header.set_cksum();
    let mebibyte = gzip(&[0; 1 << 20]);
    let mut layer = gzip(header.as_bytes());
    for _ in 0..size >> 20 {
        layer.extend_from_slice(&mebibyte);
    }
    layer.extend_from_slice(&gzip(&[0; 1024]));

    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    let blob = |media_type: &str, bytes: &[u8]| {
        let digest = sha256(bytes);
        let path = dir
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"));
        std::fs::write(path, bytes).unwrap();
        serde_json::json!({"mediaType": media_type, "digest": digest, "size": bytes.len()})
    };
    let layer = blob("application/vnd.oci.image.layer.v1.tar+gzip", &layer);
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [sha256(b"made up")]},
    });
    let config = blob(
        "application/vnd.oci.image.config.v1+json",
        &serde_json::to_vec(&config).unwrap(),
    );
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config,
        "layers": [layer],
    });
    let mut manifest = blob(
        "application/vnd.oci.image.manifest.v1+json",
        &serde_json::to_vec(&manifest).unwrap(),
    );
    manifest["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": "latest"});
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [manifest]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    dir.to_path_buf()
}

#[test]
fn a_decompression_bomb_on_a_small_disk_fails_clearly_and_leaves_no_image() {
    if !require(is_root(), "the service runs as root (and mounts a tmpfs)") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    // Declared before the service, so it is unmounted after the service stops.
    let _disk = Tmpfs::mount(&root, "512m");
    let bomb = gzip_bomb_layout(&dir.path().join("bomb"), 1 << 30);
    let registry = Registry::start();
    let reference = registry.push(&bomb, "tests/bomb:1");
    let busybox = registry.push(&test_image("busybox"), "tests/busybox:1");
    let service = Service::start_at("", &root);

    let err = service.cli_err(&["image", "pull", &reference]);
    let images = root.join("images");
    assert!(
        err.contains(&reference) && err.contains("free disk space"),
        "the error names neither the image nor the remedy: {err}"
    );
    assert!(
        err.contains(&images.join("work").display().to_string()),
        "the error does not say where space is short: {err}"
    );
    assert_eq!(service.cli_ok(&["image", "ls", "-q"]).trim(), "");
    assert!(
        files(&images.join("disks")).is_empty(),
        "a base disk remains"
    );
    assert!(files(&images.join("work")).is_empty(), "staging remains");
    let df = run_ok(Command::new("df").args(["--output=used", "-B1"]).arg(&root));
    let used: u64 = df.lines().last().unwrap().trim().parse().unwrap();
    assert!(
        used < 64 << 20,
        "the failed pull left {used} bytes on the disk"
    );

    // The same small disk takes an honest image.
    service.cli_ok(&["image", "pull", "-q", &busybox]);
    assert_eq!(inspect(&service, &busybox)["has_init"], true);
}
