//! The image trust boundary end to end: a regular user, alice, attacks another, bob, and root
//! through image names. Names are per user and content is shared, so her tags, loads and
//! removals change only her own names, and she can neither read nor save an image only
//! another user names; root publishes system-wide images everyone reads and no user changes.
//! No machine boots (`--no-boot`): what a machine is created from is the point.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use container_e2e::{Registry, Service, TestUser, is_root, require, run_ok, test_image};

/// A service, a registry with bob's image (busybox) and alice's trojan (another bootable
/// image), and the two users.
struct Scene {
    _registry: Registry,
    service: Service,
    alice: TestUser,
    bob: TestUser,
    /// The name bob uses, as the registry serves it.
    image: String,
    /// Alice's image, whose /sbin/init would run as anyone who boots it.
    trojan: String,
    /// Archives and other files every user may read.
    dir: tempfile::TempDir,
}

impl Scene {
    fn start() -> Option<Self> {
        if !require(is_root(), "the service runs as root") {
            return None;
        }
        let registry = Registry::start();
        let image = registry.push(&test_image("busybox"), "tests/busybox:1");
        let trojan = registry.push(&test_image("createuser"), "tests/trojan:1");
        let service = Service::start("");
        let dir = tempfile::tempdir().unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        Some(Scene {
            _registry: registry,
            service,
            alice: TestUser::ensure("ctalice", 1500),
            bob: TestUser::ensure("ctbob", 1501),
            image,
            trojan,
            dir,
        })
    }

    /// An OCI-layout archive of a test image whose annotation names it `name`.
    fn archive_named(&self, test: &str, name: &str) -> PathBuf {
        let layout = self.dir.path().join(format!("{test}-layout"));
        run_ok(
            Command::new("cp")
                .arg("-r")
                .arg(test_image(test))
                .arg(&layout),
        );
        name_layout(&layout, serde_json::Value::Null, name);
        self.tar(&layout)
    }

    fn tar(&self, layout: &Path) -> PathBuf {
        let archive = layout.with_extension("tar");
        run_ok(
            Command::new("tar")
                .arg("-C")
                .arg(layout)
                .arg("-cf")
                .arg(&archive)
                .arg("."),
        );
        archive
    }
}

/// Rewrites a layout's index.json so its first manifest (or `descriptor`, when given) is
/// named `name` by containerd's annotation.
fn name_layout(layout: &Path, descriptor: serde_json::Value, name: &str) {
    let path = layout.join("index.json");
    let mut index: serde_json::Value = match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap(),
        Err(_) => serde_json::json!({"schemaVersion": 2, "manifests": [descriptor]}),
    };
    let manifests = index["manifests"].as_array_mut().unwrap();
    manifests.truncate(1);
    manifests[0]["annotations"] = serde_json::json!({ "io.containerd.image.name": name });
    std::fs::write(&path, serde_json::to_vec(&index).unwrap()).unwrap();
}

/// The manifest digest `who` (root when `None`) sees under `reference`, if any.
fn digest_seen(s: &Scene, who: Option<&TestUser>, reference: &str) -> Option<String> {
    let args = ["image", "inspect", reference];
    let out = match who {
        Some(user) => user.cli(&s.service, &args),
        None => s.service.cli(&args),
    };
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("not found"), "inspect {reference}: {err}");
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    Some(v[0]["digest"].as_str().unwrap().to_string())
}

/// The image digest of a machine `who` creates (without booting it) from `reference`.
fn created_from(s: &Scene, who: Option<&TestUser>, name: &str, reference: &str) -> String {
    let create = [
        "machine",
        "create",
        reference,
        "--name",
        name,
        "--no-boot",
        "--network",
        "none",
    ];
    let inspect = ["machine", "inspect", name];
    let out = match who {
        Some(user) => {
            user.cli_ok(&s.service, &create);
            user.cli_ok(&s.service, &inspect)
        }
        None => {
            s.service.cli_ok(&create);
            s.service.cli_ok(&inspect)
        }
    };
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let machine = if v.is_array() { &v[0] } else { &v };
    machine["image"]["digest"].as_str().unwrap().to_string()
}

fn failed(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "unexpectedly succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_tag_poisons_only_its_authors_names() {
    let Some(s) = Scene::start() else { return };
    s.bob.cli_ok(&s.service, &["image", "pull", "-q", &s.image]);
    let genuine = digest_seen(&s, Some(&s.bob), &s.image).unwrap();
    s.alice
        .cli_ok(&s.service, &["image", "pull", "-q", &s.trojan]);
    let trojan = digest_seen(&s, Some(&s.alice), &s.trojan).unwrap();
    assert_ne!(genuine, trojan);

    // Alice tags her trojan as bob's image and as a name nobody has pulled yet.
    s.alice
        .cli_ok(&s.service, &["image", "tag", &s.trojan, &s.image]);
    s.alice
        .cli_ok(&s.service, &["image", "tag", &s.trojan, "debian:12"]);
    assert_eq!(
        digest_seen(&s, Some(&s.alice), &s.image),
        Some(trojan.clone())
    );

    // Bob, and root, still get the genuine image: by inspect and by what a machine is made of.
    assert_eq!(
        digest_seen(&s, Some(&s.bob), &s.image),
        Some(genuine.clone())
    );
    assert_eq!(created_from(&s, Some(&s.bob), "dev", &s.image), genuine);
    assert_eq!(digest_seen(&s, Some(&s.bob), "debian:12"), None);
    assert_eq!(digest_seen(&s, None, &s.image), None, "root pulled nothing");
    assert_eq!(digest_seen(&s, None, "debian:12"), None);
    // Root's create pulls the name into root's own names, from the registry.
    assert_eq!(created_from(&s, None, "rootdev", &s.image), genuine);
    assert_eq!(digest_seen(&s, Some(&s.alice), &s.image), Some(trojan));
}

#[test]
fn an_archive_named_after_another_users_image_names_only_the_loaders() {
    let Some(s) = Scene::start() else { return };
    s.bob.cli_ok(&s.service, &["image", "pull", "-q", &s.image]);
    let genuine = digest_seen(&s, Some(&s.bob), &s.image).unwrap();

    let archive = s.archive_named("createuser", &s.image);
    let out = s.alice.cli_ok(
        &s.service,
        &["image", "load", "-i", archive.to_str().unwrap()],
    );
    assert!(out.contains(&s.image), "{out}");
    let trojan = digest_seen(&s, Some(&s.alice), &s.image).unwrap();
    assert_ne!(trojan, genuine);
    assert_eq!(
        digest_seen(&s, Some(&s.bob), &s.image),
        Some(genuine.clone())
    );
    assert_eq!(created_from(&s, Some(&s.bob), "dev", &s.image), genuine);
    assert_eq!(s.service.cli_ok(&["image", "ls", "-q"]).trim(), "");

    // An archive that names bob's manifest by digest without carrying it claims nothing.
    let bare = s.dir.path().join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    std::fs::write(bare.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let descriptor = serde_json::json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": genuine,
        "size": 1,
    });
    name_layout(&bare, descriptor, "localhost/stolen:1");
    let archive = s.tar(&bare);
    let err = failed(&s.alice.cli(
        &s.service,
        &["image", "load", "-i", archive.to_str().unwrap()],
    ));
    assert!(err.contains("missing from the archive"), "{err}");
    assert_eq!(digest_seen(&s, Some(&s.alice), "localhost/stolen:1"), None);
}

#[test]
fn another_users_image_can_be_neither_removed_nor_saved_nor_listed() {
    let Some(s) = Scene::start() else { return };
    s.bob.cli_ok(&s.service, &["image", "pull", "-q", &s.image]);
    let genuine = digest_seen(&s, Some(&s.bob), &s.image).unwrap();
    let blobs = s.service.root.join("images/blobs/sha256");
    let count = || std::fs::read_dir(&blobs).unwrap().count();
    let before = count();

    for wanted in [s.image.as_str(), genuine.as_str()] {
        let err = failed(&s.alice.cli(&s.service, &["image", "rm", "-f", wanted]));
        assert!(err.contains("not found"), "{wanted}: {err}");
        let saved = s.dir.path().join("stolen.tar");
        let err = failed(&s.alice.cli(
            &s.service,
            &["image", "save", wanted, "-o", saved.to_str().unwrap()],
        ));
        assert!(err.contains("not found"), "{wanted}: {err}");
        assert!(!saved.exists());
    }
    assert_eq!(
        digest_seen(&s, Some(&s.bob), &s.image),
        Some(genuine.clone())
    );
    assert_eq!(count(), before, "no blob of bob's image went");
    assert_eq!(
        s.alice.cli_ok(&s.service, &["image", "ls", "-q"]).trim(),
        ""
    );

    // Every user's names are root's to see, each with its owner; no one else's.
    let err = failed(&s.alice.cli(&s.service, &["image", "ls", "--all"]));
    assert!(err.contains("only root"), "{err}");
    let all: serde_json::Value = serde_json::from_str(
        &s.service
            .cli_ok(&["image", "ls", "--all", "--format", "json"]),
    )
    .unwrap();
    assert_eq!(all.as_array().unwrap().len(), 1, "{all}");
    assert_eq!(all[0]["reference"], s.image.as_str());
    assert_eq!(all[0]["owner"], s.bob.uid);
    let table = s.service.cli_ok(&["image", "ls", "--all"]);
    assert!(table.lines().next().unwrap().contains("OWNER"), "{table}");
    assert!(table.contains(&s.bob.uid.to_string()), "{table}");
}

#[test]
fn a_system_image_is_read_by_every_user_and_changed_by_root_alone() {
    let Some(s) = Scene::start() else { return };
    let out = s
        .service
        .cli_ok(&["image", "pull", "-q", "--system", &s.image]);
    assert!(out.is_empty(), "{out}");
    let published = digest_seen(&s, None, &s.image).unwrap();
    let listed: serde_json::Value = serde_json::from_str(
        &s.alice
            .cli_ok(&s.service, &["image", "ls", "--format", "json"]),
    )
    .unwrap();
    assert_eq!(listed[0]["reference"], s.image.as_str(), "{listed}");
    assert!(listed[0]["owner"].is_null(), "{listed}");
    assert_eq!(
        created_from(&s, Some(&s.alice), "alicedev", &s.image),
        published
    );

    // Alice can neither remove it nor publish over it.
    let err = failed(&s.alice.cli(&s.service, &["image", "rm", "-f", &s.image]));
    assert!(err.contains("system-wide"), "{err}");
    s.alice
        .cli_ok(&s.service, &["image", "pull", "-q", &s.trojan]);
    for args in [
        vec!["image", "tag", "--system", &s.trojan, &s.image],
        vec!["image", "pull", "--system", &s.trojan],
        vec!["image", "rm", "--system", &s.image],
    ] {
        let err = failed(&s.alice.cli(&s.service, &args));
        assert!(err.contains("only root"), "{args:?}: {err}");
    }
    // Her own name of the same text shadows it for her alone.
    s.alice
        .cli_ok(&s.service, &["image", "tag", &s.trojan, &s.image]);
    let trojan = digest_seen(&s, Some(&s.alice), &s.trojan).unwrap();
    assert_eq!(digest_seen(&s, Some(&s.alice), &s.image), Some(trojan));
    assert_eq!(
        digest_seen(&s, Some(&s.bob), &s.image),
        Some(published.clone())
    );
    assert_eq!(
        created_from(&s, Some(&s.bob), "bobdev", &s.image),
        published
    );

    // Root withdraws it; bob's machine keeps its base disk.
    s.service
        .cli_ok(&["image", "rm", "--system", "-f", &s.image]);
    assert_eq!(digest_seen(&s, Some(&s.bob), &s.image), None);
    let hex = published.trim_start_matches("sha256:");
    assert!(
        s.service
            .root
            .join("images/disks")
            .join(hex)
            .join("base.ext4")
            .exists()
    );
}
