//! Hand-made hostile layer archives: each is refused or contained, and nothing is ever
//! written outside the root being built.

use std::path::Path;

use container_image::ImageError;
use container_image::unpack::layer::apply_layer;

/// A tar entry with a raw name (the tar crate's safe setters refuse hostile names).
fn entry(
    b: &mut tar::Builder<Vec<u8>>,
    name: &str,
    kind: tar::EntryType,
    link: Option<&str>,
    data: &[u8],
) {
    let mut h = tar::Header::new_gnu();
    {
        let raw = &mut h.as_old_mut().name;
        raw.fill(0);
        raw[..name.len()].copy_from_slice(name.as_bytes());
    }
    if let Some(l) = link {
        let raw = &mut h.as_old_mut().linkname;
        raw.fill(0);
        raw[..l.len()].copy_from_slice(l.as_bytes());
    }
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.set_cksum();
    b.append(&h, data).unwrap();
}

fn archive(entries: &[(&str, tar::EntryType, Option<&str>, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (n, k, l, d) in entries {
        entry(&mut b, n, *k, *l, d);
    }
    b.into_inner().unwrap()
}

struct Sandbox {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    outside: std::path::PathBuf,
}

/// A root to build in, beside an `outside` directory that must stay untouched.
fn sandbox() -> Sandbox {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let outside = dir.path().join("outside");
    std::fs::create_dir(&root).unwrap();
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("victim"), "original").unwrap();
    Sandbox {
        _dir: dir,
        root,
        outside,
    }
}

fn untouched(outside: &Path) {
    let names: Vec<_> = std::fs::read_dir(outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["victim"], "something was written outside the root");
    assert_eq!(
        std::fs::read_to_string(outside.join("victim")).unwrap(),
        "original"
    );
}

use tar::EntryType::{Directory, Link, Regular, Symlink};

#[test]
fn dotdot_paths_are_refused() {
    let s = sandbox();
    let tar = archive(&[("../outside/evil", Regular, None, b"x")]);
    let e = apply_layer(&s.root, tar.as_slice()).unwrap_err();
    assert!(matches!(e, ImageError::UnsafeEntry { .. }), "{e}");
    assert!(e.to_string().contains(".."), "{e}");
    untouched(&s.outside);
}

#[test]
fn absolute_paths_are_contained() {
    let s = sandbox();
    let abs = format!("{}/evil", s.outside.display());
    let tar = archive(&[(&abs, Regular, None, b"x")]);
    apply_layer(&s.root, tar.as_slice()).unwrap();
    untouched(&s.outside);
    assert!(s.root.join(abs.trim_start_matches('/')).exists());
}

#[test]
fn writing_through_a_planted_symlink_stays_inside() {
    let s = sandbox();
    let target = s.outside.display().to_string();
    // A symlink to a place the image lacks: writing through it is refused.
    let tar = archive(&[
        ("evil", Symlink, Some(&target), b""),
        ("evil/victim", Regular, None, b"pwned"),
    ]);
    let e = apply_layer(&s.root, tar.as_slice()).unwrap_err();
    assert!(matches!(e, ImageError::UnsafeEntry { .. }), "{e}");
    untouched(&s.outside);
    // A symlink climbing out resolves at the root: what is written lands inside it.
    let tar = archive(&[
        ("rel", Symlink, Some("../../../../../../.."), b""),
        ("rel/victim", Regular, None, b"contained"),
    ]);
    apply_layer(&s.root, tar.as_slice()).unwrap();
    untouched(&s.outside);
    assert_eq!(
        std::fs::read_to_string(s.root.join("victim")).unwrap(),
        "contained"
    );
    assert_eq!(
        std::fs::read_link(s.root.join("evil"))
            .unwrap()
            .display()
            .to_string(),
        target
    );
}

#[test]
fn hardlinks_cannot_reach_outside() {
    let s = sandbox();
    let victim = s.outside.join("victim").display().to_string();
    let tar = archive(&[("link", Link, Some(&victim), b"")]);
    let e = apply_layer(&s.root, tar.as_slice()).unwrap_err();
    assert!(matches!(e, ImageError::UnsafeEntry { .. }), "{e}");
    assert!(
        std::fs::read_dir(&s.root).unwrap().next().is_none(),
        "a refused hardlink creates nothing, not even its target's directories"
    );
    let tar = archive(&[("link", Link, Some("../outside/victim"), b"")]);
    assert!(apply_layer(&s.root, tar.as_slice()).is_err());
    // Through a symlink to outside: resolved inside the root, where there is no such file.
    let outside = s.outside.display().to_string();
    let tar = archive(&[
        ("sl", Symlink, Some(&outside), b""),
        ("link", Link, Some("sl/victim"), b""),
    ]);
    assert!(apply_layer(&s.root, tar.as_slice()).is_err());
    untouched(&s.outside);
    assert_eq!(
        std::fs::metadata(s.outside.join("victim")).unwrap().nlink(),
        1
    );
}

#[test]
fn whiteouts_cannot_delete_outside() {
    let s = sandbox();
    let tar = archive(&[("../outside/.wh.victim", Regular, None, b"")]);
    let e = apply_layer(&s.root, tar.as_slice()).unwrap_err();
    assert!(matches!(e, ImageError::UnsafeEntry { .. }), "{e}");
    // Through a symlink to the outside directory: resolved inside the root, where it does not
    // exist, so there is nothing to hide.
    let outside = s.outside.display().to_string();
    let tar = archive(&[
        ("sl", Symlink, Some(&outside), b""),
        ("sl/.wh.victim", Regular, None, b""),
    ]);
    apply_layer(&s.root, tar.as_slice()).unwrap();
    untouched(&s.outside);
    let tar = archive(&[
        ("up", Symlink, Some("../.."), b""),
        ("up/.wh.victim", Regular, None, b""),
    ]);
    apply_layer(&s.root, tar.as_slice()).unwrap();
    let tar = archive(&[(".wh..", Regular, None, b"")]);
    assert!(apply_layer(&s.root, tar.as_slice()).is_err());
    untouched(&s.outside);
}

#[test]
fn whiteouts_and_opaque_directories_follow_the_layer_rules() {
    let s = sandbox();
    let lower = archive(&[
        ("etc", Directory, None, b""),
        ("etc/motd", Regular, None, b"hi"),
        ("etc/keep", Regular, None, b"k"),
        ("opt", Directory, None, b""),
        ("opt/old", Regular, None, b"o"),
    ]);
    apply_layer(&s.root, lower.as_slice()).unwrap();
    let upper = archive(&[
        ("etc/.wh.motd", Regular, None, b""),
        ("opt/new", Regular, None, b"n"),
        ("opt/.wh..wh..opq", Regular, None, b""),
    ]);
    apply_layer(&s.root, upper.as_slice()).unwrap();
    assert!(!s.root.join("etc/motd").exists());
    assert!(s.root.join("etc/keep").exists());
    assert!(
        !s.root.join("opt/old").exists(),
        "opaque dir hides lower content"
    );
    assert!(s.root.join("opt/new").exists(), "but keeps its own layer's");
}

#[test]
fn truncated_and_garbage_archives_are_errors() {
    let s = sandbox();
    let mut tar = archive(&[("big", Regular, None, &[7u8; 5000])]);
    tar.truncate(1500);
    let e = apply_layer(&s.root, tar.as_slice()).unwrap_err();
    assert!(matches!(e, ImageError::Archive { .. }), "{e}");
    let garbage = vec![0x55u8; 4096];
    assert!(apply_layer(&s.root, garbage.as_slice()).is_err());
    untouched(&s.outside);
}

trait Nlink {
    fn nlink(&self) -> u64;
}
impl Nlink for std::fs::Metadata {
    fn nlink(&self) -> u64 {
        std::os::unix::fs::MetadataExt::nlink(self)
    }
}

mod random_layers {
    use super::*;
    use proptest::prelude::*;

    /// A path built from parts that matter for escapes.
    fn path_part() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "a",
            "b",
            "..",
            ".",
            "",
            "OUT",
            ".wh.a",
            ".wh..wh..opq",
        ])
    }

    fn path() -> impl Strategy<Value = String> {
        prop::collection::vec(path_part(), 1..4).prop_map(|parts| parts.join("/"))
    }

    #[derive(Debug, Clone)]
    enum Kind {
        File,
        Dir,
        Symlink(String),
        Hardlink(String),
    }

    fn kind() -> impl Strategy<Value = Kind> {
        prop_oneof![
            Just(Kind::File),
            Just(Kind::Dir),
            path().prop_map(Kind::Symlink),
            path().prop_map(Kind::Hardlink),
            Just(Kind::Symlink("OUT".into())),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Whatever the entries, nothing outside the root changes.
        #[test]
        fn nothing_escapes(entries in prop::collection::vec((path(), kind()), 1..8)) {
            let s = sandbox();
            let outside = s.outside.display().to_string();
            let fix = |p: &str| p.replace("OUT", &outside);
            let mut b = tar::Builder::new(Vec::new());
            for (p, k) in &entries {
                let name = fix(p);
                if name.is_empty() || name.len() > 99 {
                    continue;
                }
                match k {
                    Kind::File => entry(&mut b, &name, Regular, None, b"pwned"),
                    Kind::Dir => entry(&mut b, &name, Directory, None, b""),
                    Kind::Symlink(t) => entry(&mut b, &name, Symlink, Some(&fix(t)), b""),
                    Kind::Hardlink(t) => entry(&mut b, &name, Link, Some(&fix(t)), b""),
                }
            }
            let tar = b.into_inner().unwrap();
            let _ = apply_layer(&s.root, tar.as_slice());
            untouched(&s.outside);
            prop_assert_eq!(
                std::fs::metadata(s.outside.join("victim")).unwrap().nlink(),
                1
            );
            let mut beside: Vec<_> = std::fs::read_dir(s._dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            beside.sort();
            prop_assert_eq!(beside, ["outside", "root"]);
        }
    }
}
