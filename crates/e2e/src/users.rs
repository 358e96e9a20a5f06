//! Host users for tests that run the CLI as a regular (non-root) caller.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::{Service, run_ok, tail};

/// A host user for tests that must run as a regular (non-root) caller.
#[derive(Debug, Clone)]
pub struct TestUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

impl TestUser {
    /// The user with `uid`, created (with a home and bash) as `name` when no user has it.
    pub fn ensure(name: &str, uid: u32) -> Self {
        let existing = nix::unistd::User::from_uid(uid.into()).ok().flatten();
        let user = match existing {
            Some(u) => u,
            None => {
                run_ok(Command::new("useradd").args([
                    "--create-home",
                    "--shell",
                    "/bin/bash",
                    "--uid",
                    &uid.to_string(),
                    "--user-group",
                    name,
                ]));
                nix::unistd::User::from_uid(uid.into())
                    .ok()
                    .flatten()
                    .expect("the user just created")
            }
        };
        std::fs::create_dir_all(&user.dir).ok();
        let _ = nix::unistd::chown(&user.dir, Some(user.uid), Some(user.gid));
        Self {
            name: user.name,
            uid,
            gid: user.gid.as_raw(),
            home: user.dir,
        }
    }

    /// A `container` command run as this user from `cwd`.
    pub fn command(&self, service: &Service, cwd: &Path, args: &[&str]) -> Command {
        use std::os::unix::process::CommandExt;
        let mut c = service.command(args);
        c.uid(self.uid)
            .gid(self.gid)
            .current_dir(cwd)
            .env("HOME", &self.home)
            .env("USER", &self.name);
        c
    }

    /// Runs `container ARGS` as this user from their home; returns stdout or fails the test.
    pub fn cli_ok(&self, service: &Service, args: &[&str]) -> String {
        self.cli_ok_in(service, &self.home.clone(), args)
    }

    pub fn cli_ok_in(&self, service: &Service, cwd: &Path, args: &[&str]) -> String {
        let out = self
            .command(service, cwd, args)
            .output()
            .expect("run container");
        assert!(
            out.status.success(),
            "container {args:?} as {} failed ({}):\nstdout: {}\nstderr: {}\nservice log tail:\n{}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            tail(&service.log(), 60)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn cli(&self, service: &Service, args: &[&str]) -> Output {
        self.command(service, &self.home.clone(), args)
            .output()
            .expect("run container")
    }
}
