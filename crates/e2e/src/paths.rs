//! Where things are: the repository, the binaries `scripts/build.sh` installs, the test
//! images `tests/images/build.sh` builds (and caches).

use std::path::PathBuf;
use std::process::Command;

use crate::run_ok;

/// The repository root.
pub fn workspace_root() -> PathBuf {
    container_testkit::workspace()
}

/// A binary of the install prefix `scripts/build.sh` lays out.
pub fn install_bin(name: &str) -> PathBuf {
    let path = workspace_root().join("target/install/bin").join(name);
    assert!(
        path.exists(),
        "{} is missing: run scripts/build.sh first",
        path.display()
    );
    path
}

/// Builds (or takes from the cache) a test image; returns its OCI layout directory.
pub fn test_image(name: &str) -> PathBuf {
    let out = run_ok(Command::new(workspace_root().join("tests/images/build.sh")).arg(name));
    PathBuf::from(
        out.lines()
            .last()
            .expect("build.sh prints the layout path")
            .trim(),
    )
}
