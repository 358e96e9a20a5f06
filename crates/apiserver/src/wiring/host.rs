//! The core's [`Host`] port: the host's passwd database and file system.

use std::path::Path;

use container_api::ApiError;
use container_api::machine::MachineUser;

use crate::core::ports::Host;

/// The host the service runs on.
#[derive(Debug, Default)]
pub struct LocalHost;

impl Host for LocalHost {
    fn user(&self, uid: u32) -> Result<MachineUser, ApiError> {
        let user = nix::unistd::User::from_uid(uid.into())
            .map_err(|e| ApiError::internal(format!("looking up uid {uid}: {e}")))?
            .ok_or_else(|| {
                ApiError::invalid(format!(
                    "uid {uid} has no passwd entry on this host; machines take their user from it"
                ))
            })?;
        Ok(MachineUser {
            name: user.name,
            uid,
            gid: user.gid.as_raw(),
            home: user.dir.display().to_string(),
            shell: user.shell.display().to_string(),
        })
    }

    /// Runs `test` as the user, with the user's groups, through `setpriv`: the kernel decides
    /// (modes, ACLs, groups) exactly as for the user's own processes, which no check of the
    /// modes by root can match.
    fn can_read_dir(&self, uid: u32, gid: u32, path: &str) -> Result<bool, ApiError> {
        Ok(
            crate::runtime::helpers::clean_env(&mut std::process::Command::new("setpriv"))
                .arg(format!("--reuid={uid}"))
                .arg(format!("--regid={gid}"))
                .arg("--init-groups")
                .args(["test", "-d", path, "-a", "-r", path, "-a", "-x", path])
                .status()
                .map_err(|e| ApiError::internal(format!("checking access to {path}: {e}")))?
                .success(),
        )
    }

    fn is_file(&self, path: &Path) -> bool {
        path.is_file()
    }

    fn is_dir(&self, path: &Path) -> bool {
        path.is_dir()
    }
}
