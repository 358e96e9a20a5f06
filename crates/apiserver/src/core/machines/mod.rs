//! Machine requests. Every request first resolves the name *as the caller* ([`Core::visible`]):
//! another user's machine is "not found". Lifecycle operations on one machine hold its lock
//! ([`Locks`]) for their whole length, so they never interleave.
//!
//! - `lifecycle`: create, boot, start, stop, delete;
//! - `settings`: the one validator of what create and `set` accept, and `set` itself;
//! - `reboot`: whether a guest that rebooted itself is booted again;
//! - `autostart`: booting autostart machines at service start and after their VM died;
//! - `copies`: clone and snapshots (shared disk layers);
//! - `rename`: a stopped machine's new name;
//! - `forwards`: which host ports a running machine gets, and `ports`;
//! - `exec`: what `run` starts (user, working directory, environment), `run` and `cp`;
//! - `stats`: what machines cost, for `stats` and `inspect`.

mod autostart;
mod commit;
mod copies;
mod exec;
mod forwards;
mod lifecycle;
mod reboot;
mod rename;
mod settings;
mod stats;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use container_api::machine::{
    Machine, MachineImage, MachineMount, MachineState, Platform, UserSetup,
};
use container_api::{ApiError, ErrorKind};

pub(super) use autostart::Deaths;
pub use lifecycle::{DEFAULT_STOP_TIMEOUT, parse_signal};
#[cfg(test)]
pub(super) use reboot::REBOOT_LIMIT;
pub(super) use reboot::RebootPolicy;
pub(super) use settings::Claims;

use super::{Caller, Core};
use crate::machines::{MachineRecord, StoreError};

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let kind = match &e {
            StoreError::NotFound(_) => ErrorKind::NotFound,
            StoreError::Exists(_) => ErrorKind::AlreadyExists,
            StoreError::Io { .. } => ErrorKind::Internal,
        };
        ApiError::with_chain(kind, &e)
    }
}

/// Per-machine locks: lifecycle operations on one machine never interleave.
#[derive(Debug, Default)]
pub(super) struct Locks {
    inner: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Locks {
    pub(super) async fn lock(&self, name: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self
            .inner
            .lock()
            .expect("the lock table is never poisoned")
            .entry(name.to_string())
            .or_default()
            .clone();
        lock.lock_owned().await
    }
}

/// Normalises a guest path: absolute, no `.`/`..`, not `/`.
fn guest_path(path: &str) -> Result<String, ApiError> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(ApiError::invalid(format!(
            "guest path `{path}` must be absolute"
        )));
    }
    let mut parts = Vec::new();
    for c in p.components() {
        match c {
            std::path::Component::Normal(s) => parts.push(s.to_string_lossy().to_string()),
            std::path::Component::RootDir | std::path::Component::CurDir => {}
            _ => {
                return Err(ApiError::invalid(format!(
                    "guest path `{path}` may not contain `..`"
                )));
            }
        }
    }
    if parts.is_empty() {
        return Err(ApiError::invalid(
            "cannot mount over the machine's root `/`",
        ));
    }
    Ok(format!("/{}", parts.join("/")))
}

/// A deterministic MAC for a machine name (locally administered, QEMU's prefix).
fn mac_for(name: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    name.hash(&mut h);
    let v = h.finish().to_be_bytes();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", v[0], v[1], v[2])
}

impl Core {
    /// The record of `name` if the caller may see it.
    pub(super) fn visible(&self, caller: &Caller, name: &str) -> Result<MachineRecord, ApiError> {
        let record = self.state.machines.get(name)?;
        if caller.is_root() || record.owner_uid == caller.uid {
            Ok(record)
        } else {
            Err(StoreError::NotFound(name.to_string()).into())
        }
    }

    /// The machine's lock and its record read under it, if the caller may see it: a check
    /// made before the lock could be about a machine that was deleted and made again by
    /// someone else while this waited. Names that do not exist fail before taking a lock.
    pub(super) async fn lock_visible(
        &self,
        caller: &Caller,
        name: &str,
    ) -> Result<(tokio::sync::OwnedMutexGuard<()>, MachineRecord), ApiError> {
        self.visible(caller, name)?;
        let guard = self.state.locks.lock(name).await;
        let record = self.visible(caller, name)?;
        Ok((guard, record))
    }

    pub(super) fn to_api(&self, record: &MachineRecord, default: Option<&str>) -> Machine {
        let vms = &self.state.vms;
        let disk = self.state.machines.disk_path(&record.name);
        let state = vms.state(&record.name);
        let (status, booting) = state.shown();
        Machine {
            id: record.name.clone(),
            status,
            default: default == Some(record.name.as_str()),
            // As Apple's: the address of a running machine; the lease it keeps is shown apart.
            ip_address: record.ip_address.clone().filter(|_| status.is_up()),
            reserved_ip_address: record.ip_address.clone(),
            dns_name: (record.network != "none")
                .then(|| format!("{}.{}", record.name, self.state.config.names.domain)),
            cpus: record.cpus,
            memory: record.memory,
            disk_size: record.disk_size,
            disk_allocated: vms.disk_allocated(&disk),
            home_mount: record.home_mount,
            created_date: record.created,
            started_date: vms.started(&record.name),
            image: MachineImage {
                reference: record.image.clone(),
                digest: record.image_digest.clone(),
            },
            platform: Platform::host(),
            user_setup: UserSetup::from(&record.user),
            mounts: record.mounts.iter().map(MachineMount::from).collect(),
            network: record.network.clone(),
            kernel: record.kernel.clone(),
            owner_uid: record.owner_uid,
            pending_restart: record.pending_restart,
            autostart: record.autostart,
            forward_ports: record.forward_ports,
            publish: record.publish.clone(),
            ports: match status.is_up() {
                true => vms.ports(&record.name),
                false => Vec::new(),
            },
            stats: None,
            stop_reason: match status {
                MachineState::Stopped => vms.stop_reason(&record.name),
                _ => None,
            },
            booting,
        }
    }

    fn machine(&self, record: &MachineRecord) -> Result<Machine, ApiError> {
        let default = self.state.machines.default_for(record.owner_uid)?;
        Ok(self.to_api(record, default.as_deref()))
    }

    pub(super) fn machine_list(&self, caller: &Caller) -> Result<Vec<Machine>, ApiError> {
        let defaults = self.state.machines.defaults()?;
        Ok(self
            .state
            .machines
            .list()?
            .into_iter()
            .filter(|r| caller.is_root() || r.owner_uid == caller.uid)
            .map(|r| {
                let d = defaults.get(&r.owner_uid).cloned();
                self.to_api(&r, d.as_deref())
            })
            .collect())
    }

    /// The machine with what it costs now.
    pub(super) async fn machine_inspect(
        &self,
        caller: &Caller,
        name: &str,
    ) -> Result<Machine, ApiError> {
        let record = self.visible(caller, name)?;
        let mut machine = self.machine(&record)?;
        machine.stats = Some(Box::new(self.sample(&record).await));
        Ok(machine)
    }

    pub(super) async fn machine_set_default(
        &self,
        caller: &Caller,
        name: &str,
    ) -> Result<Machine, ApiError> {
        let record = self.visible(caller, name)?;
        self.state
            .machines
            .set_default(record.owner_uid, Some(name))?;
        self.machine(&record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_paths_are_normalised_and_checked() {
        assert_eq!(guest_path("/data/./x/").unwrap(), "/data/x");
        assert!(guest_path("data").is_err());
        assert!(guest_path("/a/../b").is_err());
        assert!(guest_path("/").is_err());
    }
}
