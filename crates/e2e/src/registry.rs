//! A real `docker-registry` (run by `scripts/test-registry.sh`) inside the test namespace.

use std::path::{Path, PathBuf};

use crate::{in_netns, run_ok, workspace_root};

/// A `docker-registry` on a free loopback port of [`netns`], stopped on drop.
#[derive(Debug)]
pub struct Registry {
    dir: tempfile::TempDir,
    pub addr: String,
}

impl Registry {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// `extra` is passed to `scripts/test-registry.sh start`: `--htpasswd FILE` for basic
    /// auth, `--token` for a bearer-token realm (with `--htpasswd`, one that wants a login).
    pub fn start_with(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let out = run_ok(
            in_netns(workspace_root().join("scripts/test-registry.sh"))
                .arg("start")
                .arg(dir.path())
                .args(extra),
        );
        let addr = out.lines().last().expect("an address").trim().to_string();
        Self { dir, addr }
    }

    /// Pushes an OCI layout as `name:tag`; returns the full reference.
    pub fn push(&self, layout: &Path, name_tag: &str) -> String {
        run_ok(
            in_netns(workspace_root().join("scripts/test-registry.sh"))
                .arg("push")
                .arg(self.dir.path())
                .arg(layout)
                .arg(name_tag),
        );
        format!("{}/{name_tag}", self.addr)
    }

    /// Pushes to a registry that requires basic auth (`user:password`).
    pub fn push_with_auth(&self, layout: &Path, name_tag: &str, creds: &str) -> String {
        run_ok(
            in_netns(workspace_root().join("scripts/test-registry.sh"))
                .arg("push")
                .arg(self.dir.path())
                .arg(layout)
                .arg(name_tag)
                .env("REGISTRY_CREDS", creds),
        );
        format!("{}/{name_tag}", self.addr)
    }

    /// Where the registry keeps its blobs (to corrupt them on purpose).
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// What the token server of `--token` logged: a line per token issued or refused.
    pub fn token_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("token.log")).unwrap_or_default()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = in_netns(workspace_root().join("scripts/test-registry.sh"))
            .arg("stop")
            .arg(self.dir.path())
            .output();
    }
}
