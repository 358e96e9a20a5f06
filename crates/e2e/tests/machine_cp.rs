//! `container machine cp` places files as `cp -r` and `docker cp` do, in both directions and
//! for every combination of a file or a directory (or a directory's contents, `DIR/.`) onto a
//! missing path, an existing file or an existing directory, with and without a trailing `/`;
//! a missing parent is a clear error. One busybox machine serves every case.

use std::collections::BTreeSet;
use std::path::Path;

use container_e2e::{Registry, Service, is_root, kernel_config, require, test_image};

const GUEST_TREE: &str = "mkdir -p /tmp/src/d/sub /tmp/dst/dir /tmp/dst/dir2 /tmp/dst/dir3 \
    /tmp/dst/dir4 && printf file > /tmp/src/f.txt && printf a > /tmp/src/d/a.txt && \
    printf b > /tmp/src/d/sub/b.txt && printf old > /tmp/dst/existing.txt";

/// Every file under `root` as `relative path=content`.
fn host_files(root: &Path) -> BTreeSet<String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let body = std::fs::read_to_string(&p).unwrap();
                out.insert(format!(
                    "{}={body}",
                    p.strip_prefix(root).unwrap().display()
                ));
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(root, root, &mut out);
    out
}

/// What every case leaves at the destination, as `relative path=content`.
fn expected() -> BTreeSet<String> {
    [
        // file → missing path: becomes it.
        "new.txt=file",
        // file → existing file: overwrites it.
        "existing.txt=file",
        // file → existing directory, with and without a trailing slash: goes into it.
        "dir/f.txt=file",
        "dir2/f.txt=file",
        // directory → missing path (with and without a trailing slash): becomes it.
        "newd/a.txt=a",
        "newd/sub/b.txt=b",
        "newd2/a.txt=a",
        "newd2/sub/b.txt=b",
        // directory → existing directory (the source with a trailing slash too): goes into it.
        "dir/d/a.txt=a",
        "dir/d/sub/b.txt=b",
        "dir3/d/a.txt=a",
        "dir3/d/sub/b.txt=b",
        // DIR/. → existing directory or missing path: its contents.
        "dir4/a.txt=a",
        "dir4/sub/b.txt=b",
        "newc/a.txt=a",
        "newc/sub/b.txt=b",
    ]
    .into_iter()
    .map(String::from)
    .collect()
}

/// `(source, destination)` below the source and destination roots, for every case that
/// succeeds.
const CASES: &[(&str, &str)] = &[
    ("f.txt", "new.txt"),
    ("f.txt", "existing.txt"),
    ("f.txt", "dir"),
    ("f.txt", "dir2/"),
    ("d", "newd"),
    ("d", "newd2/"),
    ("d", "dir"),
    ("d/", "dir3"),
    ("d/.", "dir4"),
    ("d/.", "newc"),
];

/// `(source, destination, what the error says)` for every case that fails.
const ERRORS: &[(&str, &str, &str)] = &[
    ("f.txt", "nodir/", "no such directory"),
    ("f.txt", "existing.txt/", "not a directory"),
    ("d", "existing.txt", "cannot copy a directory onto"),
    (
        "f.txt",
        "no/such/x",
        "does not exist (cp creates the destination, not its parents)",
    ),
    ("f.txt/", "dir", "not a directory"),
];

#[test]
fn cp_follows_cp_semantics_in_both_directions() {
    if !require(is_root(), "the service runs as root") {
        return;
    }
    let registry = Registry::start();
    let image = registry.push(&test_image("busybox"), "tests/busybox:1");
    let service = Service::start(&format!(
        "[machine]\ncpus = 1\nmemory = \"512M\"\nhome-mount = \"none\"\n{}",
        kernel_config()
    ));
    service.cli_ok(&["machine", "create", &image, "--name", "cp"]);
    service.cli_ok(&["machine", "run", "-n", "cp", GUEST_TREE]);
    let guest_files = || -> BTreeSet<String> {
        service
            .cli_ok(&[
                "machine",
                "run",
                "-n",
                "cp",
                "cd /tmp/dst && find . -type f | sort | while read f; do echo \"${f#./}=$(cat $f)\"; done",
            ])
            .lines()
            .map(String::from)
            .collect()
    };

    // Host → machine.
    let host = tempfile::tempdir().unwrap();
    let src = host.path().join("src");
    std::fs::create_dir_all(src.join("d/sub")).unwrap();
    std::fs::write(src.join("f.txt"), "file").unwrap();
    std::fs::write(src.join("d/a.txt"), "a").unwrap();
    std::fs::write(src.join("d/sub/b.txt"), "b").unwrap();
    let at_host = |p: &str| format!("{}/{p}", src.display());
    for (from, to) in CASES {
        service.cli_ok(&[
            "machine",
            "cp",
            &at_host(from),
            &format!("cp:/tmp/dst/{to}"),
        ]);
    }
    for (from, to, says) in ERRORS {
        let e = service.cli_err(&[
            "machine",
            "cp",
            &at_host(from),
            &format!("cp:/tmp/dst/{to}"),
        ]);
        assert!(
            e.to_lowercase().contains(says),
            "cp {from} cp:/tmp/dst/{to}: {e}"
        );
    }
    assert_eq!(guest_files(), expected(), "host → machine");

    // Machine → host, onto the same kinds of destination.
    let dst = host.path().join("dst");
    for d in ["dir", "dir2", "dir3", "dir4"] {
        std::fs::create_dir_all(dst.join(d)).unwrap();
    }
    std::fs::write(dst.join("existing.txt"), "old").unwrap();
    let at_host = |p: &str| format!("{}/{p}", dst.display());
    for (from, to) in CASES {
        service.cli_ok(&[
            "machine",
            "cp",
            &format!("cp:/tmp/src/{from}"),
            &at_host(to),
        ]);
    }
    for (from, to, says) in ERRORS {
        let e = service.cli_err(&[
            "machine",
            "cp",
            &format!("cp:/tmp/src/{from}"),
            &at_host(to),
        ]);
        assert!(
            e.to_lowercase().contains(says),
            "cp cp:/tmp/src/{from} {to}: {e}"
        );
    }
    assert_eq!(host_files(&dst), expected(), "machine → host");
    assert!(!dst.join("nodir").exists() && !dst.join("no").exists());

    // The report that started this: a file out of the machine onto a path that does not
    // exist yet, from a relative destination.
    let work = host.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let out = service
        .command(&["machine", "cp", "cp:/tmp/src/f.txt", "back"])
        .current_dir(&work)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(work.join("back")).unwrap(), "file");
    service.cli_ok(&["machine", "rm", "-f", "cp"]);
}
