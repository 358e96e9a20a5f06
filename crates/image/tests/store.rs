//! The store without a registry: archives in and out, references, garbage collection, and
//! recovery from interrupted work. Base disks are real (`mkfs.ext4`), checked with `debugfs`.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;

use common::*;
use container_image::{ImageError, ImageStore, Namespace};

fn tools() -> bool {
    have("mkfs.ext4") && have("debugfs")
}

/// A layout archive with one busybox image tagged `tag` (ref.name annotation).
fn busybox_archive(dir: &std::path::Path, tag: &str) -> (Vec<u8>, String) {
    let (archive, m) = marked_archive(dir, tag, "busybox");
    (archive, m["digest"].as_str().unwrap().to_string())
}

/// A layout archive with a busybox image whose config carries `mark` (so each mark is its
/// own image, sharing its layers with the others), tagged `tag`; and its manifest descriptor.
fn marked_archive(dir: &std::path::Path, tag: &str, mark: &str) -> (Vec<u8>, serde_json::Value) {
    let mut layout = Layout::new(dir);
    let m = layout.image("amd64", marked_config(mark), &busybox_layers());
    layout.tag(m.clone(), tag);
    (layout.archive(), m)
}

/// The busybox config, labelled with `mark` unless that is `busybox`.
fn marked_config(mark: &str) -> serde_json::Value {
    let mut config = busybox_config();
    if mark != "busybox" {
        config["Labels"] = serde_json::json!({ "mark": mark });
    }
    config
}

const ALICE: Namespace = Namespace::User(1000);
const BOB: Namespace = Namespace::User(1001);

#[test]
fn loads_an_oci_archive_with_uncompressed_gzip_and_zstd_layers() {
    if !tools() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let (archive, digest) = busybox_archive(&work.path().join("layout"), "example.org/bb:1");
    let store = ImageStore::open(&work.path().join("store")).unwrap();
    let loaded = store
        .load(ROOT, archive.as_slice(), &store.work_dir())
        .unwrap();
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
    // Another user's private image is not theirs to read on disk either.
    let mode = |p: &std::path::Path| {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions())
            & 0o777
    };
    assert_eq!(mode(disk), 0o600);
    assert_eq!(mode(disk.parent().unwrap()), 0o700);
    let blobs = work.path().join("store/blobs/sha256");
    assert_eq!(mode(&blobs), 0o700);
    for blob in std::fs::read_dir(&blobs).unwrap() {
        assert_eq!(mode(&blob.unwrap().path()), 0o600);
    }
    // A disk built before (0644 in a 0755 directory) is made private when the store opens.
    std::fs::set_permissions(disk, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(
        disk.parent().unwrap(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    drop(store);
    let store = ImageStore::open(&work.path().join("store")).unwrap();
    assert_eq!(mode(disk), 0o600);
    assert_eq!(mode(disk.parent().unwrap()), 0o700);

    // Lookups by reference, short name, digest and digest prefix.
    let prefix = &digest["sha256:".len().."sha256:".len() + 12];
    for wanted in ["example.org/bb:1", digest.as_str(), prefix] {
        assert_eq!(
            store.inspect(ROOT, wanted).unwrap().digest,
            digest,
            "{wanted}"
        );
    }
    assert!(matches!(
        store.inspect(ROOT, "nothing:here"),
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
        .load(ROOT, layout.archive().as_slice(), &store.work_dir())
        .unwrap();
    let has: BTreeMap<_, _> = loaded
        .iter()
        .map(|r| (r.reference.as_str(), r.has_init()))
        .collect();
    assert_eq!(has["docker.io/library/noinit:1"], Some(false));
    assert_eq!(has["docker.io/library/noinit:2"], Some(false));
    assert_eq!(has["docker.io/library/init:3"], Some(true));
    assert!(store.has_init(ROOT, "init:3").unwrap());
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
    let loaded = store
        .load(ROOT, archive.as_slice(), &store.work_dir())
        .unwrap();
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
            .load(ROOT, b.into_inner().unwrap().as_slice(), &store.work_dir())
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
        .load(ROOT, b.into_inner().unwrap().as_slice(), &store.work_dir())
        .unwrap_err();
    assert!(e.to_string().contains("missing"), "{e}");
    assert!(store.list(ROOT).unwrap().is_empty());

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
        .load(ROOT, layout.archive().as_slice(), &store.work_dir())
        .unwrap_err();
    assert!(matches!(e, ImageError::DigestMismatch { .. }), "{e}");
    assert!(store.list(ROOT).unwrap().is_empty());
    assert!(names(&work.path().join("store/disks")).is_empty());

    // A truncated archive.
    let e = store
        .load(ROOT, &archive[..archive.len() / 3], &store.work_dir())
        .unwrap_err();
    assert!(
        matches!(
            e,
            ImageError::Archive { .. } | ImageError::SizeMismatch { .. }
        ),
        "{e}"
    );
    assert!(store.list(ROOT).unwrap().is_empty());
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
        .load(ROOT, layout.archive().as_slice(), &store.work_dir())
        .unwrap();
    store.tag(ROOT, "a:1", "a:alias").unwrap();
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
    let r = store.remove(ROOT, "a:alias", &in_use, false).unwrap();
    assert_eq!(r.untagged, ["docker.io/library/a:alias"]);
    assert!(r.deleted.is_empty());

    // The last reference of an image a machine uses: refused, with the machine named.
    let e = store.remove(ROOT, "a:1", &in_use, false).unwrap_err();
    assert!(matches!(e, ImageError::InUse { .. }), "{e}");
    assert!(e.to_string().contains("dev"), "{e}");
    assert_eq!(store.list(ROOT).unwrap().len(), 2);

    // Forced: the image goes, its base disk stays for the machine; the shared layer stays.
    let disk_a = root.join("disks").join(da.trim_start_matches("sha256:"));
    let r = store.remove(ROOT, "a:1", &in_use, true).unwrap();
    assert_eq!(
        r.deleted.len(),
        1 + 1 + 2,
        "manifest, config, two own layers: {r:?}"
    );
    assert!(disk_a.join("base.ext4").exists());
    assert!(
        store
            .content()
            .contains(&store.inspect(ROOT, "b:1").unwrap().layers[0].digest)
    );
    assert!(store.inspect(ROOT, "b:1").unwrap().has_init().is_some());

    // Once no machine uses it, the next collection takes the disk.
    let r = store.collect_garbage(&none).unwrap();
    assert!(r.freed_bytes > 0);
    assert!(!disk_a.exists());

    // Removing by digest untags every name of the image and empties the store.
    store.tag(ROOT, "b:1", "b:2").unwrap();
    let r = store.remove(ROOT, &db, &none, false).unwrap();
    assert_eq!(r.untagged.len(), 2);
    assert!(names(&root.join("blobs/sha256")).is_empty());
    assert!(names(&root.join("disks")).is_empty());
    assert!(store.list(ROOT).unwrap().is_empty());
}

#[test]
fn usage_counts_shared_content_once_and_foretells_what_removal_frees() {
    if !tools() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let mut layout = Layout::new(&work.path().join("alice"));
    let a = layout.image("amd64", marked_config("a"), &busybox_layers());
    let b = layout.image("amd64", marked_config("b"), &busybox_layers());
    layout.tag(a, "a:1").tag(b, "b:1");
    let root = work.path().join("store");
    let store = ImageStore::open(&root).unwrap();
    store
        .load(ALICE, layout.archive().as_slice(), &store.work_dir())
        .unwrap();
    let (bob_archive, _) = marked_archive(&work.path().join("bob"), "b:1", "b");
    store
        .load(BOB, bob_archive.as_slice(), &store.work_dir())
        .unwrap();
    let disks: u64 = names(&root.join("disks"))
        .iter()
        .map(|d| {
            let base = std::fs::metadata(root.join("disks").join(d).join("base.ext4")).unwrap();
            std::os::unix::fs::MetadataExt::blocks(&base) * 512
        })
        .sum();
    let none = BTreeMap::new();

    // Alice's two images share their layers: every blob and both disks, each once.
    let blobs: u64 = names(&root.join("blobs/sha256"))
        .iter()
        .map(|n| {
            std::fs::metadata(root.join("blobs/sha256").join(n))
                .unwrap()
                .len()
        })
        .sum();
    let usage = store.usage(ALICE, &[], &none).unwrap();
    assert_eq!(usage.reclaimable, 0, "untagging nothing frees nothing");
    assert_eq!(
        usage.bytes,
        blobs + disks,
        "blobs and base disks: {usage:?}"
    );

    // Untagging a:1 would free its manifest, config and disk, not the shared layers; it
    // changes nothing, and removing it then frees just that.
    let a1 = ["docker.io/library/a:1".to_string()];
    let foretold = store.usage(ALICE, &a1, &none).unwrap().reclaimable;
    assert!(foretold > 0);
    assert_eq!(store.list(ALICE).unwrap().len(), 2);
    let removed = store.remove(ALICE, "a:1", &none, false).unwrap();
    assert_eq!(removed.deleted.len(), 2, "manifest and config: {removed:?}");
    assert_eq!(removed.freed_bytes, foretold);

    // b:1 is Bob's too: untagging Alice's name would free nothing while his reaches it.
    let b1 = ["docker.io/library/b:1".to_string()];
    assert_eq!(store.usage(ALICE, &b1, &none).unwrap().reclaimable, 0);
    assert_eq!(
        store
            .remove(ALICE, "b:1", &none, false)
            .unwrap()
            .freed_bytes,
        0
    );
    // Alice sees no image left and holds nothing; Bob's image stays whole.
    assert_eq!(store.usage(ALICE, &[], &none).unwrap().bytes, 0);
    assert!(store.usage(BOB, &[], &none).unwrap().bytes > 0);
}

#[test]
fn an_image_held_for_a_machine_outlives_its_removal_until_released() {
    if !tools() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let (archive, digest) = busybox_archive(&work.path().join("layout"), "base:1");
    let root = work.path().join("store");
    let store = ImageStore::open(&root).unwrap();
    store
        .load(ALICE, archive.as_slice(), &store.work_dir())
        .unwrap();
    let none = BTreeMap::new();

    // A create holds the image, then the name goes (a prune, an rm) before the machine is
    // recorded: the disk the machine is being made from stays, and so do the blobs.
    let (record, (disk, info), hold) = store.hold_base_disk(ALICE, "base:1").unwrap();
    assert_eq!(
        (record.digest.as_str(), info.has_init),
        (digest.as_str(), true)
    );
    let removed = store.remove(ALICE, "base:1", &none, false).unwrap();
    assert!(removed.deleted.is_empty(), "{removed:?}");
    assert!(disk.exists());
    assert!(store.collect_garbage(&none).unwrap().deleted.is_empty());
    // Once the machine is recorded, it is what keeps the disk (`in_use`); with none, the
    // next collection takes everything.
    drop(hold);
    let r = store.collect_garbage(&none).unwrap();
    assert!(!r.deleted.is_empty() && !disk.exists(), "{r:?}");
    assert!(names(&root.join("blobs/sha256")).is_empty());

    // A name removed before the hold is simply not found.
    let e = store.hold_base_disk(ALICE, "base:1").unwrap_err();
    assert!(matches!(e, ImageError::NotFound(_)), "{e}");
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
        store
            .load(ROOT, archive.as_slice(), &store.work_dir())
            .unwrap();
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
    let r = store.inspect(ROOT, "x:1").unwrap();
    assert_eq!(r.digest, digest);
    assert_eq!(r.has_init(), Some(true));
    // Loading again stores nothing new and keeps the disk.
    let disk = r.disk.unwrap().0;
    let before = std::fs::metadata(&disk).unwrap().modified().unwrap();
    store
        .load(ROOT, archive.as_slice(), &store.work_dir())
        .unwrap();
    assert_eq!(
        std::fs::metadata(&disk).unwrap().modified().unwrap(),
        before
    );
}

#[test]
fn one_users_names_are_neither_seen_nor_changed_by_another() {
    if !tools() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("store");
    let store = ImageStore::open(&root).unwrap();
    let (bobs, bob_image) = marked_archive(&work.path().join("bob"), "debian:12", "bob");
    let bob_digest = bob_image["digest"].as_str().unwrap().to_string();
    store.load(BOB, bobs.as_slice(), &store.work_dir()).unwrap();
    let prefix = &bob_digest[..7 + 12];

    // Alice sees none of Bob's names, by name, digest or digest prefix.
    assert!(store.list(ALICE).unwrap().is_empty());
    for wanted in ["debian:12", bob_digest.as_str(), prefix] {
        let e = store.inspect(ALICE, wanted).unwrap_err();
        assert!(matches!(e, ImageError::NotFound(_)), "{wanted}: {e}");
        let e = store
            .save(ALICE, &[wanted.to_string()], Vec::new())
            .unwrap_err();
        assert!(matches!(e, ImageError::NotFound(_)), "{wanted}: {e}");
        let e = store.tag(ALICE, wanted, "mine:1").unwrap_err();
        assert!(matches!(e, ImageError::NotFound(_)), "{wanted}: {e}");
        let e = store
            .remove(ALICE, wanted, &BTreeMap::new(), true)
            .unwrap_err();
        assert!(matches!(e, ImageError::NotFound(_)), "{wanted}: {e}");
    }

    // Alice's trojan under Bob's name, by tag and by an archive's own annotation: hers alone.
    let (trojan, trojan_image) = marked_archive(&work.path().join("alice"), "evil:1", "trojan");
    let trojan_digest = trojan_image["digest"].as_str().unwrap().to_string();
    store
        .load(ALICE, trojan.as_slice(), &store.work_dir())
        .unwrap();
    store.tag(ALICE, "evil:1", "debian:12").unwrap();
    let (named, _) = marked_archive(&work.path().join("alice2"), "debian:12", "trojan");
    store
        .load(ALICE, named.as_slice(), &store.work_dir())
        .unwrap();
    assert_eq!(
        store.inspect(ALICE, "debian:12").unwrap().digest,
        trojan_digest
    );
    assert_eq!(store.inspect(BOB, "debian:12").unwrap().digest, bob_digest);
    assert_eq!(store.base_disk(BOB, "debian:12").unwrap(), {
        let r = store.inspect(BOB, "debian:12").unwrap();
        r.disk.unwrap()
    });
    let bobs_view: Vec<_> = store.list(BOB).unwrap();
    assert_eq!(bobs_view.len(), 1);
    assert_eq!(bobs_view[0].references, ["docker.io/library/debian:12"]);
    assert_eq!(bobs_view[0].namespace, BOB);

    // Naming Bob's digest in an archive without carrying its bytes claims nothing; carrying
    // other bytes under its name neither.
    let mut bare = Layout::new(&work.path().join("bare"));
    bare.tag(bob_image.clone(), "stolen:1");
    let e = store
        .load(ALICE, bare.archive().as_slice(), &store.work_dir())
        .unwrap_err();
    assert!(e.to_string().contains("missing from the archive"), "{e}");
    std::fs::write(
        bare.dir
            .join("blobs/sha256")
            .join(bob_digest.trim_start_matches("sha256:")),
        b"not bob's manifest",
    )
    .unwrap();
    let e = store
        .load(ALICE, bare.archive().as_slice(), &store.work_dir())
        .unwrap_err();
    assert!(
        matches!(
            e,
            ImageError::SizeMismatch { .. } | ImageError::DigestMismatch { .. }
        ),
        "{e}"
    );
    assert!(matches!(
        store.inspect(ALICE, "stolen:1"),
        Err(ImageError::NotFound(_))
    ));

    // Alice's rm of her own debian:12 leaves Bob's, and collection keeps every blob and the
    // base disk Bob's name reaches, though they are shared with Alice's image.
    let r = store
        .remove(ALICE, "debian:12", &BTreeMap::new(), false)
        .unwrap();
    assert_eq!(r.untagged, ["docker.io/library/debian:12"]);
    store
        .remove(ALICE, &trojan_digest, &BTreeMap::new(), false)
        .unwrap();
    assert!(store.list(ALICE).unwrap().is_empty());
    let bob_record = store.inspect(BOB, "debian:12").unwrap();
    assert!(store.content().contains(&bob_record.config_digest));
    for l in &bob_record.layers {
        assert!(store.content().contains(&l.digest), "{l:?}");
    }
    assert!(bob_record.disk.unwrap().0.exists());
    assert!(
        !root
            .join("disks")
            .join(trojan_digest.trim_start_matches("sha256:"))
            .exists()
    );

    // Root sees every namespace's names, each with its owner.
    store
        .load(ALICE, trojan.as_slice(), &store.work_dir())
        .unwrap();
    let all: Vec<_> = store
        .list_all()
        .unwrap()
        .into_iter()
        .map(|r| (r.namespace, r.reference, r.digest))
        .collect();
    assert_eq!(
        all,
        [
            (ALICE, "docker.io/library/evil:1".to_string(), trojan_digest),
            (BOB, "docker.io/library/debian:12".to_string(), bob_digest),
        ]
    );
}

#[test]
fn system_names_are_read_by_every_user_and_changed_only_in_the_system_namespace() {
    if !tools() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&work.path().join("store")).unwrap();
    let (archive, digest) = busybox_archive(&work.path().join("layout"), "base:1");
    store
        .load(Namespace::System, archive.as_slice(), &store.work_dir())
        .unwrap();
    for user in [ALICE, BOB, ROOT] {
        let seen = store.list(user).unwrap();
        assert_eq!(seen.len(), 1, "{user}");
        assert_eq!(seen[0].namespace, Namespace::System);
        assert_eq!(store.inspect(user, "base:1").unwrap().digest, digest);
    }

    // A user can neither remove it (by name or digest) nor repoint it for others.
    for wanted in ["base:1", digest.as_str()] {
        let e = store
            .remove(ALICE, wanted, &BTreeMap::new(), true)
            .unwrap_err();
        assert!(matches!(e, ImageError::SystemImage(_)), "{e}");
    }
    let (trojan, trojan_image) = marked_archive(&work.path().join("trojan"), "base:1", "trojan");
    store
        .load(ALICE, trojan.as_slice(), &store.work_dir())
        .unwrap();
    let trojan_digest = trojan_image["digest"].as_str().unwrap();
    assert_eq!(
        store.inspect(ALICE, "base:1").unwrap().digest,
        trojan_digest
    );
    assert_eq!(store.inspect(ALICE, "base:1").unwrap().namespace, ALICE);
    assert_eq!(store.inspect(BOB, "base:1").unwrap().digest, digest);
    assert_eq!(
        store.inspect(Namespace::System, "base:1").unwrap().digest,
        digest
    );

    // Her own name gone, she sees the system one again; her tag of it is hers.
    store
        .remove(ALICE, "base:1", &BTreeMap::new(), false)
        .unwrap();
    assert_eq!(store.inspect(ALICE, "base:1").unwrap().digest, digest);
    let mine = store.tag(ALICE, "base:1", "mine:1").unwrap();
    assert_eq!(
        (mine.namespace, mine.digest.as_str()),
        (ALICE, digest.as_str())
    );
    assert!(matches!(
        store.inspect(BOB, "mine:1"),
        Err(ImageError::NotFound(_))
    ));

    // Root withdraws it from the system namespace; Alice's own name still holds the image.
    store
        .remove(Namespace::System, "base:1", &BTreeMap::new(), false)
        .unwrap();
    assert!(store.list(BOB).unwrap().is_empty());
    assert!(store.base_disk(ALICE, "mine:1").is_ok());
}

#[test]
fn a_store_from_before_namespaces_migrates_on_open() {
    if !tools() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("store");
    let (archive, digest) = busybox_archive(&work.path().join("layout"), "old:1");
    {
        let store = ImageStore::open(&root).unwrap();
        store
            .load(ROOT, archive.as_slice(), &store.work_dir())
            .unwrap();
    }
    // The one global table of the first stores, and what a crash in the middle of the
    // migration's write leaves beside it: the old file stays whole until the rename.
    let old = serde_json::json!({"references": {"docker.io/library/old:1": digest}});
    std::fs::write(root.join("refs.json"), serde_json::to_vec(&old).unwrap()).unwrap();
    std::fs::write(root.join(".refs.json.tmp-99999"), b"{\"namesp").unwrap();

    let store = ImageStore::open(&root).unwrap();
    for ns in [ROOT, Namespace::System] {
        let r = store.inspect(ns, "old:1").unwrap();
        assert_eq!((r.namespace, r.digest.as_str()), (ns, digest.as_str()));
    }
    // Every user keeps seeing the image, through the system namespace, and cannot remove it.
    assert_eq!(
        store.inspect(ALICE, "old:1").unwrap().namespace,
        Namespace::System
    );
    let e = store
        .remove(ALICE, "old:1", &BTreeMap::new(), false)
        .unwrap_err();
    assert!(matches!(e, ImageError::SystemImage(_)), "{e}");
    let file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("refs.json")).unwrap()).unwrap();
    assert!(file.get("references").is_none(), "{file}");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(root.join("refs.json"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "every user's names are root's to read");
    assert_eq!(
        file["namespaces"]["0"]["references"]["docker.io/library/old:1"],
        digest.as_str()
    );
    assert_eq!(
        file["namespaces"]["system"]["references"]["docker.io/library/old:1"],
        digest.as_str()
    );
    // Root's rm leaves the system name, which keeps the blobs.
    store
        .remove(ROOT, "old:1", &BTreeMap::new(), false)
        .unwrap();
    assert!(store.base_disk(BOB, "old:1").unwrap().1.has_init);
    drop(store);
    // Opening again changes nothing.
    let store = ImageStore::open(&root).unwrap();
    assert_eq!(store.inspect(BOB, "old:1").unwrap().digest, digest);
    assert!(matches!(
        store.inspect(ROOT, "old:1").unwrap().namespace,
        Namespace::System
    ));
}
