//! The store without a registry: archives in and out, references, garbage collection, and
//! recovery from interrupted work. Base disks are real (`mkfs.ext4`), checked with `debugfs`.

mod common;

use std::collections::BTreeMap;

use common::*;
use container_image::{ImageError, ImageStore};

fn tools() -> bool {
    have("mkfs.ext4") && have("debugfs")
}

/// A layout archive with one busybox image tagged `tag` (ref.name annotation).
fn busybox_archive(dir: &std::path::Path, tag: &str) -> (Vec<u8>, String) {
    let mut layout = Layout::new(dir);
    let m = layout.image("amd64", busybox_config(), &busybox_layers());
    let digest = m["digest"].as_str().unwrap().to_string();
    layout.tag(m, tag);
    (layout.archive(), digest)
}

#[test]
fn loads_an_oci_archive_with_uncompressed_gzip_and_zstd_layers() {
    if !tools() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let (archive, digest) = busybox_archive(&work.path().join("layout"), "example.org/bb:1");
    let store = ImageStore::open(&work.path().join("store")).unwrap();
    let loaded = store.load(archive.as_slice(), &store.work_dir()).unwrap();
    assert_eq!(loaded.len(), 1);
    let r = &loaded[0];
    assert_eq!(r.reference, "example.org/bb:1");
    assert_eq!(r.digest, digest);
    assert_eq!(r.has_init(), Some(true));
    let media: Vec<_> = r.layers.iter().map(|l| l.media_type.as_str()).collect();
    assert!(
        media.contains(&"application/vnd.oci.image.layer.v1.tar"),
        "{media:?}"
    );
    let disk = &r.disk.as_ref().unwrap().0;
    assert!(debugfs(disk, "cat /etc/top").contains("third layer, uncompressed"));
    assert_eq!(
        disk,
        &work
            .path()
            .join("store/disks")
            .join(digest.trim_start_matches("sha256:"))
            .join("base.ext4")
    );

    // Lookups by reference, short name, digest and digest prefix.
    let prefix = &digest["sha256:".len().."sha256:".len() + 12];
    for wanted in ["example.org/bb:1", digest.as_str(), prefix] {
        assert_eq!(store.inspect(wanted).unwrap().digest, digest, "{wanted}");
    }
    assert!(matches!(
        store.inspect("nothing:here"),
        Err(ImageError::NotFound(_))
    ));
}

#[test]
fn images_without_init_are_reported() {
    if !tools() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let mut layout = Layout::new(&work.path().join("layout"));
    // /sbin/init climbs out of the root: resolved inside it, it names nothing.
    let escaping = layer(&[
        E::Dir("sbin", 0o755),
        E::Symlink("sbin/init", "../../../../bin/sh"),
    ]);
    let m = layout.image("amd64", serde_json::json!({}), &[(escaping, Comp::Gzip)]);
    layout.tag(m, "noinit:1");
    let not_exec = layer(&[E::Dir("sbin", 0o755), E::File("sbin/init", 0o644, b"x")]);
    let m = layout.image("amd64", serde_json::json!({}), &[(not_exec, Comp::Gzip)]);
    layout.tag(m, "noinit:2");
    let via_link = layer(&[
        E::Dir("lib", 0o755),
        E::Dir("lib/systemd", 0o755),
        E::File("lib/systemd/systemd", 0o755, b"#!/bin/sh\n"),
        E::Dir("sbin", 0o755),
        E::Symlink("sbin/init", "../lib/systemd/systemd"),
    ]);
    let m = layout.image("amd64", serde_json::json!({}), &[(via_link, Comp::Gzip)]);
    layout.tag(m, "init:3");
    let store = ImageStore::open(&work.path().join("store")).unwrap();
    let loaded = store
        .load(layout.archive().as_slice(), &store.work_dir())
        .unwrap();
    let has: BTreeMap<_, _> = loaded
        .iter()
        .map(|r| (r.reference.as_str(), r.has_init()))
        .collect();
    assert_eq!(has["docker.io/library/noinit:1"], Some(false));
    assert_eq!(has["docker.io/library/noinit:2"], Some(false));
    assert_eq!(has["docker.io/library/init:3"], Some(true));
    assert!(store.has_init("init:3").unwrap());
}

#[test]
fn loads_a_docker_save_archive() {
    if !tools() {
        return;
    }
    let layers = busybox_layers();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"StopSignal": "SIGRTMIN+3"},
        "rootfs": {"type": "layers", "diff_ids": []},
    }))
    .unwrap();
    let config_name = format!("{}.json", &sha256(&config)["sha256:".len()..]);
    // Legacy layout: `<id>/layer.tar`, uncompressed; a duplicate layer is a symlink.
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, data).unwrap();
    };
    add(&config_name, &config);
    add("aaa/layer.tar", &layers[0].0);
    add("bbb/layer.tar", &layers[1].0);
    let manifest = serde_json::json!([{
        "Config": config_name,
        "RepoTags": ["busybox:saved", "127.0.0.1:5000/x/busybox:saved"],
        "Layers": ["aaa/layer.tar", "bbb/layer.tar", "ccc/layer.tar"],
    }]);
    add("manifest.json", &serde_json::to_vec(&manifest).unwrap());
    add("repositories", br#"{"busybox":{"saved":"aaa"}}"#);
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_cksum();
    b.append_link(&mut h, "ccc/layer.tar", "../bbb/layer.tar")
        .unwrap();
    let archive = b.into_inner().unwrap();

    let work = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&work.path().join("store")).unwrap();
    let loaded = store.load(archive.as_slice(), &store.work_dir()).unwrap();
    let refs: Vec<_> = loaded.iter().map(|r| r.reference.as_str()).collect();
    assert_eq!(
        refs,
        [
            "docker.io/library/busybox:saved",
            "127.0.0.1:5000/x/busybox:saved"
        ]
    );
    let r = &loaded[0];
    assert_eq!(r.layers.len(), 3);
    assert_eq!(r.layers[1].digest, r.layers[2].digest);
    assert_eq!(r.config.stop_signal.as_deref(), Some("SIGRTMIN+3"));
    assert_eq!(r.has_init(), Some(true));
    let disk = &r.disk.as_ref().unwrap().0;
    assert!(debugfs(disk, "cat /opt/old/new").contains("upper"));
}

#[test]
fn hostile_archives_cannot_read_host_files_or_leave_images() {
    if !tools() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&work.path().join("store")).unwrap();
    let secret = work.path().join("secret.json");
    std::fs::write(&secret, r#"{"config":{"Env":["TOKEN=hunter2"]}}"#).unwrap();
    // A docker manifest naming host files, by absolute and by climbing path.
    let climbing = format!("../../../../../../..{}", secret.display());
    for config in [secret.display().to_string(), climbing] {
        let mut b = tar::Builder::new(Vec::new());
        let manifest =
            serde_json::json!([{"Config": config, "RepoTags": ["evil:1"], "Layers": []}]);
        let data = serde_json::to_vec(&manifest).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "manifest.json", data.as_slice())
            .unwrap();
        let e = store
            .load(b.into_inner().unwrap().as_slice(), &store.work_dir())
            .unwrap_err();
        assert!(matches!(e, ImageError::Malformed { .. }), "{e}");
        assert!(e.to_string().contains("missing"), "{e}");
    }
    // A member symlinked to a host file is only a name: it resolves to nothing.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_cksum();
    b.append_link(&mut h, "index.json", &secret).unwrap();
    let e = store
        .load(b.into_inner().unwrap().as_slice(), &store.work_dir())
        .unwrap_err();
    assert!(e.to_string().contains("missing"), "{e}");
    assert!(store.list().unwrap().is_empty());

    // A blob whose bytes do not match its name.
    let (archive, _) = busybox_archive(&work.path().join("layout"), "good:1");
    let mut layout = Layout::new(&work.path().join("tampered"));
    let m = layout.image("amd64", busybox_config(), &busybox_layers());
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            layout
                .dir
                .join("blobs/sha256")
                .join(&m["digest"].as_str().unwrap()["sha256:".len()..]),
        )
        .unwrap(),
    )
    .unwrap();
    let victim = layout
        .dir
        .join("blobs/sha256")
        .join(&manifest["layers"][0]["digest"].as_str().unwrap()["sha256:".len()..]);
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&victim, bytes).unwrap();
    layout.tag(m, "tampered:1");
    let e = store
        .load(layout.archive().as_slice(), &store.work_dir())
        .unwrap_err();
    assert!(matches!(e, ImageError::DigestMismatch { .. }), "{e}");
    assert!(store.list().unwrap().is_empty());
    assert!(names(&work.path().join("store/disks")).is_empty());

    // A truncated archive.
    let e = store
        .load(&archive[..archive.len() / 3], &store.work_dir())
        .unwrap_err();
    assert!(
        matches!(
            e,
            ImageError::Archive { .. } | ImageError::SizeMismatch { .. }
        ),
        "{e}"
    );
    assert!(store.list().unwrap().is_empty());
    assert!(names(&work.path().join("store/ingest")).is_empty());
}

#[test]
fn removal_collects_only_what_no_reference_or_machine_needs() {
    if !tools() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let mut layout = Layout::new(&work.path().join("layout"));
    let layers = busybox_layers();
    let shared = layers[0].clone();
    let a = layout.image("amd64", busybox_config(), &layers);
    let b = layout.image(
        "amd64",
        serde_json::json!({}),
        &[
            shared.clone(),
            (layer(&[E::File("etc/only-b", 0o644, b"b\n")]), Comp::Gzip),
        ],
    );
    let (da, db) = (
        a["digest"].as_str().unwrap().to_string(),
        b["digest"].as_str().unwrap().to_string(),
    );
    layout.tag(a, "a:1").tag(b, "b:1");
    let root = work.path().join("store");
    let store = ImageStore::open(&root).unwrap();
    store
        .load(layout.archive().as_slice(), &store.work_dir())
        .unwrap();
    store.tag("a:1", "a:alias").unwrap();
    let blobs_before = names(&root.join("blobs/sha256")).len();
    assert_eq!(
        blobs_before,
        2 + 2 + 3 + 1,
        "manifests, configs, shared layer stored once"
    );

    let none = BTreeMap::new();
    let mut in_use = BTreeMap::new();
    in_use.insert(da.clone(), vec!["dev".to_string()]);

    // Another reference remains: untagging is fine even though a machine uses the image.
    let r = store.remove("a:alias", &in_use, false).unwrap();
    assert_eq!(r.untagged, ["docker.io/library/a:alias"]);
    assert!(r.deleted.is_empty());

    // The last reference of an image a machine uses: refused, with the machine named.
    let e = store.remove("a:1", &in_use, false).unwrap_err();
    assert!(matches!(e, ImageError::InUse { .. }), "{e}");
    assert!(e.to_string().contains("dev"), "{e}");
    assert_eq!(store.list().unwrap().len(), 2);

    // Forced: the image goes, its base disk stays for the machine; the shared layer stays.
    let disk_a = root.join("disks").join(da.trim_start_matches("sha256:"));
    let r = store.remove("a:1", &in_use, true).unwrap();
    assert_eq!(
        r.deleted.len(),
        1 + 1 + 2,
        "manifest, config, two own layers: {r:?}"
    );
    assert!(disk_a.join("base.ext4").exists());
    assert!(
        store
            .content()
            .contains(&store.inspect("b:1").unwrap().layers[0].digest)
    );
    assert!(store.inspect("b:1").unwrap().has_init().is_some());

    // Once no machine uses it, the next collection takes the disk.
    let r = store.collect_garbage(&none).unwrap();
    assert!(r.freed_bytes > 0);
    assert!(!disk_a.exists());

    // Removing by digest untags every name of the image and empties the store.
    store.tag("b:1", "b:2").unwrap();
    let r = store.remove(&db, &none, false).unwrap();
    assert_eq!(r.untagged.len(), 2);
    assert!(names(&root.join("blobs/sha256")).is_empty());
    assert!(names(&root.join("disks")).is_empty());
    assert!(store.list().unwrap().is_empty());
}

#[test]
fn a_killed_operation_leaves_a_consistent_store() {
    if !tools() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("store");
    let (archive, digest) = busybox_archive(&work.path().join("layout"), "x:1");
    {
        let store = ImageStore::open(&root).unwrap();
        store.load(archive.as_slice(), &store.work_dir()).unwrap();
    }
    // What a kill mid-pull and mid-build leaves: an ingest file and a staging tree.
    std::fs::write(root.join("ingest/.tmpKILLED"), b"partial").unwrap();
    std::fs::create_dir_all(root.join("work/.build-KILLED/rootfs/dev")).unwrap();
    // And a half-built disk from a build that never got renamed: not under disks/.
    let store = ImageStore::open(&root).unwrap();
    assert!(names(&root.join("ingest")).is_empty());
    assert!(names(&root.join("work")).is_empty());
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(root.join("work")).unwrap().permissions(),
    );
    assert_eq!(
        mode & 0o777,
        0o700,
        "staging trees hold setuid files and devices"
    );
    let r = store.inspect("x:1").unwrap();
    assert_eq!(r.digest, digest);
    assert_eq!(r.has_init(), Some(true));
    // Loading again stores nothing new and keeps the disk.
    let disk = r.disk.unwrap().0;
    let before = std::fs::metadata(&disk).unwrap().modified().unwrap();
    store.load(archive.as_slice(), &store.work_dir()).unwrap();
    assert_eq!(
        std::fs::metadata(&disk).unwrap().modified().unwrap(),
        before
    );
}
