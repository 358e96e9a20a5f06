//! Pulls from a real registry (Debian's `docker-registry`, on loopback), images pushed there
//! by `skopeo` from layouts built here; base disks checked with `debugfs`.

mod common;

use std::sync::Mutex;

use common::*;
use container_image::{ImageError, ImageStore, Progress, PullOptions};

fn tools() -> bool {
    ["docker-registry", "skopeo", "debugfs", "mkfs.ext4"]
        .iter()
        .all(|t| have(t))
}

/// Progress events, recorded.
#[derive(Default)]
struct Events(Mutex<Vec<Progress>>);

impl Events {
    fn reporter(&self) -> impl Fn(Progress) + Send + Sync + '_ {
        |p| self.0.lock().unwrap().push(p)
    }
    fn take(&self) -> Vec<Progress> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
}

#[tokio::test]
async fn pulls_an_image_into_a_base_disk_with_every_kind_of_entry() {
    if !tools() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let mut layout = Layout::new(&work.path().join("layout"));
    let amd64 = layout.image("amd64", busybox_config(), &busybox_layers());
    // An index with another platform first: the pull must pick linux/amd64.
    let arm = layout.image(
        "arm64",
        serde_json::json!({}),
        &[(layer(&[E::File("arm", 0o644, b"arm\n")]), Comp::Gzip)],
    );
    let index = layout.index(&[arm, amd64.clone()]);
    layout.tag(index, "1");
    let registry = Registry::start(None);
    let reference = registry.push(&layout.dir, "1", "test/busybox:1", None);

    let store = ImageStore::open(&work.path().join("store")).unwrap();
    let events = Events::default();
    let record = store
        .pull(
            ROOT,
            &reference,
            &PullOptions::default(),
            &events.reporter(),
        )
        .await
        .unwrap();
    // skopeo compresses the uncompressed layer when pushing, so the manifest is not ours byte
    // for byte; its config (which names the platform) is.
    let config_of = |manifest: &[u8]| -> String {
        let m: serde_json::Value = serde_json::from_slice(manifest).unwrap();
        m["config"]["digest"].as_str().unwrap().to_string()
    };
    let local = layout.dir.join("blobs/sha256").join(
        amd64["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:"),
    );
    assert_eq!(
        record.config_digest,
        config_of(&std::fs::read(local).unwrap()),
        "the linux/amd64 image was picked from the index"
    );
    assert_eq!(record.config.architecture, "amd64");
    assert_eq!(record.references, std::slice::from_ref(&reference));
    assert_eq!(record.layers.len(), 3);
    assert_eq!(record.config.stop_signal.as_deref(), Some("SIGPWR"));
    assert_eq!(record.has_init(), Some(true));
    let first = events.take();
    assert!(first.contains(&Progress::Resolved {
        digest: record.digest.clone(),
        layers: 3
    }));
    let fetched = first
        .iter()
        .filter(|p| matches!(p, Progress::BlobDone { cached: false, .. }))
        .count();
    assert_eq!(fetched, 4, "config and three layers fetched: {first:?}");

    let (disk, info) = store.base_disk(ROOT, &reference).unwrap();
    assert_eq!(disk, record.disk.as_ref().unwrap().0);
    assert!(info.has_init);
    let init = debugfs(&disk, "stat /sbin/init");
    assert!(init.contains("Type: symlink"), "{init}");
    assert!(init.contains("/bin/busybox"), "{init}");
    assert!(debugfs(&disk, "cat /etc/passwd").contains("root:x:0:0:root:/root:/bin/sh"));
    let su = debugfs(&disk, "stat /usr/bin/su");
    assert!(su.contains("Mode:  04755"), "setuid kept: {su}");
    let tmp = debugfs(&disk, "stat /tmp");
    assert!(tmp.contains("Mode:  01777"), "sticky kept: {tmp}");
    let file = debugfs(&disk, "stat /home/file");
    assert!(
        file.contains("User:  1234   Group:  1234"),
        "owner kept: {file}"
    );
    assert!(file.contains("Mode:  0600"), "{file}");
    let sh = debugfs(&disk, "stat /bin/sh");
    assert!(sh.contains("Links: 2"), "hardlink kept: {sh}");
    let null = debugfs(&disk, "stat /dev/null");
    assert!(null.contains("character special"), "{null}");
    assert!(
        debugfs(&disk, "stat /dev/pipe").contains("Type: FIFO"),
        "fifo kept"
    );
    let xattr = debugfs(&disk, "ea_list /etc/labelled");
    assert!(
        xattr.contains("user.test") && xattr.contains("hello"),
        "{xattr}"
    );
    let etc = debugfs(&disk, "ls /etc");
    assert!(!etc.contains("motd"), "whiteout applied: {etc}");
    assert!(etc.contains("hostname") && etc.contains("top"), "{etc}");
    let opt = debugfs(&disk, "ls /opt/old");
    assert!(
        opt.contains("new") && !opt.contains("gone"),
        "opaque dir: {opt}"
    );
    let mtime = debugfs(&disk, "stat /etc");
    assert!(
        mtime.contains("2023"),
        "directory mtime from the layer: {mtime}"
    );
    // Growable online far beyond its size, and labelled for the agent.
    let header = run(std::process::Command::new("dumpe2fs").arg("-h").arg(&disk));
    assert!(
        header.contains("Filesystem volume name:   root"),
        "{header}"
    );
    let reserved: u64 = header
        .lines()
        .find_map(|l| l.strip_prefix("Reserved GDT blocks:"))
        .expect("a resize inode")
        .trim()
        .parse()
        .unwrap();
    assert!(reserved > 0, "{header}");
    assert!(
        !names(&work.path().join("store/work"))
            .iter()
            .any(|n| !n.is_empty()),
        "staging removed"
    );

    // Again: nothing is fetched, the disk is reused.
    let again = store
        .pull(
            ROOT,
            &reference,
            &PullOptions::default(),
            &events.reporter(),
        )
        .await
        .unwrap();
    assert_eq!(again.digest, record.digest);
    let second = events.take();
    assert!(
        second.iter().all(|p| !matches!(
            p,
            Progress::Bytes { .. } | Progress::BlobDone { cached: false, .. }
        )),
        "{second:?}"
    );
    assert_eq!(store.list(ROOT).unwrap().len(), 1);
}

#[tokio::test]
async fn pulls_docker_v2_manifests() {
    if !tools() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let mut layout = Layout::new(&work.path().join("layout"));
    // Docker's format has no zstd: gzip layers only.
    let layers: Vec<_> = busybox_layers()
        .into_iter()
        .map(|(tar, _)| (tar, Comp::Gzip))
        .collect();
    let m = layout.image("amd64", busybox_config(), &layers);
    layout.tag(m, "1");
    let registry = Registry::start(None);
    let reference = registry.push_as_docker(&layout.dir, "1", "test/docker:1");
    let store = ImageStore::open(&work.path().join("store")).unwrap();
    let record = store
        .pull(ROOT, &reference, &PullOptions::default(), &|_: Progress| {})
        .await
        .unwrap();
    assert_eq!(
        record.media_type,
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert!(
        record
            .layers
            .iter()
            .all(|l| l.media_type == "application/vnd.docker.image.rootfs.diff.tar.gzip")
    );
    assert_eq!(record.has_init(), Some(true));
    let disk = &record.disk.as_ref().unwrap().0;
    assert!(debugfs(disk, "cat /opt/old/new").contains("upper"));
}

#[tokio::test]
async fn a_corrupt_or_truncated_blob_leaves_no_image() {
    if !tools() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let registry = Registry::start(None);
    let (layout, reference) = push_busybox(work.path(), &registry, "test/corrupt:1", None);
    let store_dir = work.path().join("store");
    let store = ImageStore::open(&store_dir).unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            layout
                .dir
                .join("blobs/sha256")
                .join(layout_manifest_hex(&layout.dir)),
        )
        .unwrap(),
    )
    .unwrap();
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let data = registry.blob_file(&layer);
    let good = std::fs::read(&data).unwrap();

    // Same length, different bytes: the digest cannot match.
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    std::fs::write(&data, &bad).unwrap();
    let e = store
        .pull(ROOT, &reference, &PullOptions::default(), &|_: Progress| {})
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ImageError::DigestMismatch { digest, .. } if *digest == layer),
        "{e}"
    );
    assert!(
        store.list(ROOT).unwrap().is_empty(),
        "no reference recorded"
    );
    assert!(!store.content().contains(&layer));
    assert!(names(&store_dir.join("disks")).is_empty(), "no base disk");
    assert!(
        names(&store_dir.join("ingest")).is_empty(),
        "no ingest left"
    );

    // Shorter than the manifest says.
    std::fs::write(&data, &good[..good.len() / 2]).unwrap();
    let e = store
        .pull(ROOT, &reference, &PullOptions::default(), &|_: Progress| {})
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ImageError::SizeMismatch { digest, .. } if *digest == layer),
        "{e}"
    );
    assert!(store.list(ROOT).unwrap().is_empty());
    assert!(names(&store_dir.join("ingest")).is_empty());

    // Repaired, the next pull completes (reusing what the failed ones verified).
    std::fs::write(&data, &good).unwrap();
    let record = store
        .pull(ROOT, &reference, &PullOptions::default(), &|_: Progress| {})
        .await
        .unwrap();
    assert_eq!(record.has_init(), Some(true));
}

/// The hex of the only manifest a layout's index.json names.
fn layout_manifest_hex(dir: &std::path::Path) -> String {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string()
}

#[tokio::test]
async fn broken_compression_is_a_clear_error_and_leaves_no_image() {
    if !tools() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let mut layout = Layout::new(&work.path().join("layout"));
    let tar = layer(&[E::File("big", 0o644, &[7u8; 200_000])]);
    let gz = compress(&tar, Comp::Gzip);
    let truncated = layout.raw_image(&[(
        "application/vnd.oci.image.layer.v1.tar+gzip",
        gz[..gz.len() / 2].to_vec(),
    )]);
    layout.tag(truncated, "truncated");
    let mislabelled = layout.raw_image(&[(
        "application/vnd.oci.image.layer.v1.tar+gzip",
        compress(&tar, Comp::Zstd),
    )]);
    layout.tag(mislabelled, "mislabelled");
    let registry = Registry::start(None);
    let store_dir = work.path().join("store");
    let store = ImageStore::open(&store_dir).unwrap();
    for tag in ["truncated", "mislabelled"] {
        let reference = registry.push(&layout.dir, tag, &format!("test/broken:{tag}"), None);
        let e = store
            .pull(ROOT, &reference, &PullOptions::default(), &|_: Progress| {})
            .await
            .unwrap_err();
        assert!(matches!(e, ImageError::Archive { .. }), "{tag}: {e}");
        assert!(store.list(ROOT).unwrap().is_empty(), "{tag}: no reference");
        assert!(names(&store_dir.join("disks")).is_empty(), "{tag}: no disk");
        assert!(
            names(&store_dir.join("work")).is_empty(),
            "{tag}: no staging"
        );
    }
}

#[tokio::test]
async fn a_registry_with_basic_auth_needs_the_right_credentials() {
    if !tools() || !have("htpasswd") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let htpasswd = htpasswd(work.path(), "alice", "s3cret");
    let registry = Registry::start(Some(&htpasswd));
    let (_, reference) = push_busybox(
        work.path(),
        &registry,
        "private/busybox:1",
        Some("alice:s3cret"),
    );
    let store = ImageStore::open(&work.path().join("store")).unwrap();
    let opts = PullOptions {
        uid: 1000,
        ..PullOptions::default()
    };

    let e = store
        .pull(ROOT, &reference, &opts, &|_: Progress| {})
        .await
        .unwrap_err();
    assert!(matches!(e, ImageError::Unauthorized { .. }), "{e}");
    assert!(e.to_string().contains("container registry login"), "{e}");

    let creds = store.credentials(1000);
    let e = creds
        .login(&registry.addr, "alice", "wrong", &[])
        .await
        .unwrap_err();
    assert!(matches!(e, ImageError::Unauthorized { .. }), "{e}");
    assert!(
        names(&work.path().join("store/auth")).is_empty(),
        "wrong credentials are not stored"
    );

    creds
        .login(&registry.addr, "alice", "s3cret", &[])
        .await
        .unwrap();
    let auth_file = work.path().join("store/auth/1000.json");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&auth_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let record = store
        .pull(ROOT, &reference, &opts, &|_: Progress| {})
        .await
        .unwrap();
    assert_eq!(record.has_init(), Some(true));

    // Another user's credentials are theirs alone.
    let e = store
        .pull(
            ROOT,
            &reference,
            &PullOptions {
                uid: 1001,
                ..PullOptions::default()
            },
            &|_: Progress| {},
        )
        .await
        .unwrap_err();
    assert!(matches!(e, ImageError::Unauthorized { .. }), "{e}");

    assert!(creds.logout(&registry.addr).unwrap());
    store
        .remove(ROOT, &reference, &Default::default(), false)
        .unwrap();
    let e = store
        .pull(ROOT, &reference, &opts, &|_: Progress| {})
        .await
        .unwrap_err();
    assert!(matches!(e, ImageError::Unauthorized { .. }), "{e}");
}

#[tokio::test]
async fn missing_images_and_plain_http_elsewhere_fail_clearly() {
    if !tools() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let registry = Registry::start(None);
    let store = ImageStore::open(&work.path().join("store")).unwrap();
    let e = store
        .pull(
            ROOT,
            &format!("{}/no/such:image", registry.addr),
            &PullOptions::default(),
            &|_: Progress| {},
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not found"), "{e}");
    let e = store
        .pull(
            ROOT,
            "Not A Reference",
            &PullOptions::default(),
            &|_: Progress| {},
        )
        .await
        .unwrap_err();
    assert!(matches!(e, ImageError::InvalidReference { .. }), "{e}");
}

#[tokio::test]
async fn saved_archives_round_trip_through_load_and_skopeo() {
    if !tools() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let registry = Registry::start(None);
    let (_, reference) = push_busybox(work.path(), &registry, "test/saved:1", None);
    let store = ImageStore::open(&work.path().join("a")).unwrap();
    let pulled = store
        .pull(ROOT, &reference, &PullOptions::default(), &|_: Progress| {})
        .await
        .unwrap();
    store.tag(ROOT, &reference, "saved-alias:2").unwrap();

    let archive = work.path().join("saved.tar");
    store
        .save(
            ROOT,
            &[reference.clone(), "saved-alias:2".into()],
            std::fs::File::create(&archive).unwrap(),
        )
        .unwrap();

    let other = ImageStore::open(&work.path().join("b")).unwrap();
    let loaded = other
        .load(
            ROOT,
            std::fs::File::open(&archive).unwrap(),
            &other.work_dir(),
        )
        .unwrap();
    let refs: Vec<_> = loaded.iter().map(|r| r.reference.clone()).collect();
    assert_eq!(
        refs,
        [reference.clone(), "docker.io/library/saved-alias:2".into()]
    );
    assert!(loaded.iter().all(|r| r.digest == pulled.digest));
    assert_eq!(loaded[0].has_init(), Some(true));

    // skopeo reads our archive and the registry gets the very same manifest.
    let copied = format!("{}/test/copied:1", registry.addr);
    run(std::process::Command::new("skopeo")
        .args(["copy", "-q", "--dest-tls-verify=false"])
        .arg(format!("oci-archive:{}:{reference}", archive.display()))
        .arg(format!("docker://{copied}")));
    let third = ImageStore::open(&work.path().join("c")).unwrap();
    let again = third
        .pull(ROOT, &copied, &PullOptions::default(), &|_: Progress| {})
        .await
        .unwrap();
    assert_eq!(again.digest, pulled.digest);
}

#[tokio::test]
async fn a_pull_cancelled_mid_download_leaves_nothing_and_the_next_completes() {
    if !tools() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let registry = Registry::start(None);
    let (_, reference) = push_busybox(work.path(), &registry, "test/cancel:1", None);
    let root = work.path().join("store");
    let store = ImageStore::open(&root).unwrap();
    let started = tokio::sync::Notify::new();
    let report = |p: Progress| {
        if matches!(p, Progress::Bytes { current, total, .. } if current < total) {
            started.notify_one();
        }
    };
    let opts = PullOptions::default();
    tokio::select! {
        r = store.pull(ROOT, &reference, &opts, &report) => {
            panic!("the pull finished before it could be cancelled: {r:?}")
        }
        _ = started.notified() => {}
    }
    // The pull's future is dropped mid-blob, as when a client goes away.
    assert!(store.list(ROOT).unwrap().is_empty());
    assert!(
        names(&root.join("ingest")).is_empty(),
        "partial blob removed"
    );
    assert!(names(&root.join("disks")).is_empty());
    let record = store
        .pull(ROOT, &reference, &PullOptions::default(), &|_: Progress| {})
        .await
        .unwrap();
    assert_eq!(record.has_init(), Some(true));
}

/// A registry behind a token server, as public registries are: the pull follows the
/// WWW-Authenticate challenge to the realm and pulls with the JWT it gets there.
#[tokio::test]
async fn a_token_registry_serves_anonymous_pulls_through_its_realm() {
    if !tools() || !have("openssl") || !have("python3") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let registry = Registry::start_token(None);
    // skopeo gets a push token from the same server: the setup is a real token registry.
    let (_, reference) = push_busybox(work.path(), &registry, "public/busybox:1", None);
    let store = ImageStore::open(&work.path().join("store")).unwrap();
    let record = store
        .pull(ROOT, &reference, &PullOptions::default(), &|_: Progress| {})
        .await
        .unwrap();
    assert_eq!(record.has_init(), Some(true));
    let log = registry.token_log();
    assert!(
        log.contains("token for 'anonymous': repository:public/busybox:pull\n"),
        "the pull did not go through the token realm:\n{log}"
    );
}

#[tokio::test]
async fn a_token_registry_that_wants_credentials_needs_login() {
    if !tools() || !have("openssl") || !have("python3") || !have("htpasswd") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let htpasswd = htpasswd(work.path(), "alice", "s3cret");
    let registry = Registry::start_token(Some(&htpasswd));
    let (_, reference) = push_busybox(
        work.path(),
        &registry,
        "private/busybox:1",
        Some("alice:s3cret"),
    );
    let store_dir = work.path().join("store");
    let store = ImageStore::open(&store_dir).unwrap();
    let opts = PullOptions {
        uid: 1000,
        ..PullOptions::default()
    };

    // Anonymous: the token server hands out a token granting nothing, the registry refuses.
    let e = store
        .pull(ROOT, &reference, &opts, &|_: Progress| {})
        .await
        .unwrap_err();
    assert!(matches!(e, ImageError::Unauthorized { .. }), "{e}");
    let login = format!("container registry login {}", registry.addr);
    assert!(e.to_string().contains(&login), "{e}");
    assert!(store.list(ROOT).unwrap().is_empty());

    // Wrong password: the token server itself refuses; nothing is stored.
    let creds = store.credentials(1000);
    let e = creds
        .login(&registry.addr, "alice", "wrong", &[])
        .await
        .unwrap_err();
    assert!(matches!(e, ImageError::Unauthorized { .. }), "{e}");
    assert!(names(&store_dir.join("auth")).is_empty());
    assert!(
        registry.token_log().contains("wrong user name or password"),
        "{}",
        registry.token_log()
    );

    creds
        .login(&registry.addr, "alice", "s3cret", &[])
        .await
        .unwrap();
    let record = store
        .pull(ROOT, &reference, &opts, &|_: Progress| {})
        .await
        .unwrap();
    assert_eq!(record.has_init(), Some(true));
    let log = registry.token_log();
    assert!(
        log.contains("token for 'alice': repository:private/busybox:pull\n"),
        "{log}"
    );
}

/// JSON `bytes` long, at least: `value` with a `pad` annotation of spaces.
fn padded(mut value: serde_json::Value, bytes: usize) -> Vec<u8> {
    value["annotations"] = serde_json::json!({"pad": " ".repeat(bytes)});
    serde_json::to_vec(&value).unwrap()
}

/// The manifest JSON of a layout's only image.
fn layout_manifest(dir: &std::path::Path) -> serde_json::Value {
    let path = dir.join("blobs/sha256").join(layout_manifest_hex(dir));
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[tokio::test]
async fn manifests_indexes_and_configs_over_4_mib_are_refused() {
    if !tools() {
        return;
    }
    const OVER: usize = 5 << 20;
    let work = tempfile::tempdir().unwrap();
    let registry = Registry::start(None);
    let store_dir = work.path().join("store");
    let store = ImageStore::open(&store_dir).unwrap();
    let pull = |reference: String| {
        let store = &store;
        async move {
            store
                .pull(ROOT, &reference, &PullOptions::default(), &|_: Progress| {})
                .await
                .unwrap_err()
        }
    };
    let assert_refused = |e: &ImageError, what: &str, reference: &str| {
        assert!(
            matches!(e, ImageError::TooLarge { limit, .. } if *limit == 4 << 20),
            "{what}: {e}"
        );
        let text = e.to_string();
        assert!(
            text.contains(what) && text.contains(reference),
            "the error does not name the {what} and the image: {text}"
        );
        assert!(
            store.list(ROOT).unwrap().is_empty(),
            "{what}: an image was recorded"
        );
        assert!(names(&store_dir.join("disks")).is_empty());
        assert!(names(&store_dir.join("ingest")).is_empty());
    };

    // A manifest and an index over the limit, as a hostile registry serves them (they are
    // read, as oci-client reads every manifest whole, then refused).
    let (layout, reference) = push_busybox(work.path(), &registry, "test/huge:1", None);
    let manifest = layout_manifest(&layout.dir);
    let index = |manifests: Vec<serde_json::Value>| {
        serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        })
    };
    let hostile = FakeRegistry::serve(vec![
        (
            "/v2/test/huge/manifests/manifest".into(),
            "application/vnd.oci.image.manifest.v1+json".into(),
            padded(manifest.clone(), OVER),
        ),
        (
            "/v2/test/huge/manifests/index".into(),
            "application/vnd.oci.image.index.v1+json".into(),
            padded(index(vec![]), OVER),
        ),
    ]);
    for tag in ["manifest", "index"] {
        let e = pull(format!("{}/test/huge:{tag}", hostile.addr)).await;
        assert_refused(&e, &format!("manifest {tag}"), &format!("test/huge:{tag}"));
    }

    // An index naming a manifest it says is over the limit, from the real registry: refused
    // before it is requested.
    let big = padded(manifest.clone(), OVER);
    let big_digest = sha256(&big);
    let named = index(vec![serde_json::json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": big_digest, "size": big.len(),
        "platform": {"architecture": "amd64", "os": "linux"},
    })]);
    registry.plant_manifest(
        "test/huge",
        Some("names-big"),
        &serde_json::to_vec(&named).unwrap(),
    );
    let e = pull(format!("{}/test/huge:names-big", registry.addr)).await;
    assert_refused(&e, &format!("manifest {big_digest}"), "test/huge:names-big");
    assert!(
        !registry.log().contains(&format!("manifests/{big_digest}")),
        "the manifest was fetched before being refused"
    );

    // A config that says it is over the limit (which skopeo would not even push): refused
    // before it is fetched.
    let config_hex = manifest["config"]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let mut config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(layout.dir.join("blobs/sha256").join(config_hex)).unwrap(),
    )
    .unwrap();
    config["config"]["Labels"] = serde_json::json!({"pad": " ".repeat(OVER)});
    let config = serde_json::to_vec(&config).unwrap();
    let config_digest = registry.plant_blob("test/huge", &config);
    let mut with_config = manifest.clone();
    with_config["config"]["digest"] = config_digest.clone().into();
    with_config["config"]["size"] = config.len().into();
    registry.plant_manifest(
        "test/huge",
        Some("config"),
        &serde_json::to_vec(&with_config).unwrap(),
    );
    let e = pull(format!("{}/test/huge:config", registry.addr)).await;
    assert_refused(&e, &format!("config {config_digest}"), "test/huge:config");
    assert!(
        !registry.log().contains(&format!("blobs/{config_digest}")),
        "the config was fetched before being refused"
    );

    // The same registry's honest image pulls.
    let record = store
        .pull(ROOT, &reference, &PullOptions::default(), &|_: Progress| {})
        .await
        .unwrap();
    assert_eq!(record.has_init(), Some(true));
}

#[tokio::test]
async fn a_decompression_bomb_fails_clearly_and_leaves_no_image() {
    if !tools() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let mut layout = Layout::new(&work.path().join("layout"));
    // 96 MiB of zeros: a few hundred kilobytes of gzip, a few of zstd.
    let zeros = vec![0u8; 96 << 20];
    let bomb = layer(&[E::File("zeros", 0o644, &zeros)]);
    for (tag, comp) in [("gzip", Comp::Gzip), ("zstd", Comp::Zstd)] {
        let mut layers = busybox_layers();
        layers.push((bomb.clone(), comp));
        let m = layout.image("amd64", busybox_config(), &layers);
        layout.tag(m, tag);
    }
    let m = layout.image("amd64", busybox_config(), &busybox_layers());
    layout.tag(m, "honest");
    let registry = Registry::start(None);
    let store_dir = work.path().join("store");
    let limits = container_image::Limits {
        max_unpacked_bytes: 32 << 20,
    };
    let store = ImageStore::open_with(&store_dir, limits).unwrap();
    for tag in ["gzip", "zstd"] {
        let reference = registry.push(&layout.dir, tag, &format!("test/bomb:{tag}"), None);
        let e = store
            .pull(ROOT, &reference, &PullOptions::default(), &|_: Progress| {})
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ImageError::TooLarge { limit, .. } if *limit == 32 << 20),
            "{tag}: {e}"
        );
        let text = e.to_string();
        let bomb_layer = store
            .content()
            .list()
            .unwrap()
            .into_iter()
            .find(|d| text.contains(d.as_str()));
        assert!(
            text.contains(&reference) && bomb_layer.is_some(),
            "{tag}: the error names neither the image nor the layer: {text}"
        );
        assert!(text.contains("decompression bomb"), "{tag}: {text}");
        assert!(
            store.list(ROOT).unwrap().is_empty(),
            "{tag}: an image was recorded"
        );
        assert!(
            names(&store_dir.join("disks")).is_empty(),
            "{tag}: a disk remains"
        );
        assert!(
            names(&store_dir.join("work")).is_empty(),
            "{tag}: staging remains"
        );
    }
    // The limit leaves room for honest images.
    let reference = registry.push(&layout.dir, "honest", "test/bomb:honest", None);
    let record = store
        .pull(ROOT, &reference, &PullOptions::default(), &|_: Progress| {})
        .await
        .unwrap();
    assert_eq!(record.has_init(), Some(true));
}

/// A port on loopback where nothing listens.
fn dead_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    drop(l);
    addr
}

#[tokio::test]
async fn mirrors_are_tried_in_order_before_the_registry_and_recorded() {
    if !tools() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let mirror = Registry::start(None);
    // The mirror holds the registry's path under a prefix, as a pull-through cache of
    // several registries does.
    push_busybox(work.path(), &mirror, "hub/library/alpine:latest", None);
    // The registry the reference names is down: only the mirror can serve it.
    let upstream = dead_port();
    let down = dead_port();
    let reference = format!("{upstream}/library/alpine:latest");
    let mut opts = PullOptions::default();
    opts.mirrors.insert(
        upstream.clone(),
        vec![
            container_image::Mirror::parse(&down, false).unwrap(),
            container_image::Mirror::parse(&format!("{}/hub", mirror.addr), false).unwrap(),
        ],
    );
    let store = ImageStore::open(&work.path().join("store")).unwrap();
    let events = Events::default();
    let record = store
        .pull(ROOT, &reference, &opts, &events.reporter())
        .await
        .unwrap();
    assert_eq!(record.references, std::slice::from_ref(&reference));
    assert_eq!(
        record.source,
        Some(container_image::ImageSource {
            reference: format!("{}/hub/library/alpine:latest", mirror.addr),
            mirror: true,
        }),
        "the record says which mirror served the image"
    );
    let steps: Vec<String> = events
        .take()
        .into_iter()
        .filter_map(|e| match e {
            Progress::Step(s) => Some(s),
            _ => None,
        })
        .collect();
    assert!(
        steps[0].starts_with(&format!("http://{down} (mirror) failed")),
        "the mirror that is down is reported and skipped: {steps:?}"
    );
    // Kept across a reopen, and carried to a new name.
    let store = ImageStore::open(&work.path().join("store")).unwrap();
    let tagged = store.tag(ROOT, &reference, "mine:1").unwrap();
    assert_eq!(tagged.source, record.source);
    assert_eq!(
        store.inspect(ROOT, &reference).unwrap().source,
        record.source
    );

    // Nobody has it: every failure is named, the registry's last.
    let mut opts = PullOptions::default();
    opts.mirrors.insert(
        upstream.clone(),
        vec![container_image::Mirror::parse(&down, false).unwrap()],
    );
    let e = store
        .pull(
            ROOT,
            &format!("{upstream}/library/other:1"),
            &opts,
            &|_: Progress| {},
        )
        .await
        .unwrap_err();
    assert!(matches!(e, ImageError::AllSourcesFailed { .. }), "{e}");
    let chain = format!("{e}: {}", std::error::Error::source(&e).unwrap());
    assert!(
        chain.contains(&down) && chain.contains(&upstream),
        "{chain}"
    );
}
