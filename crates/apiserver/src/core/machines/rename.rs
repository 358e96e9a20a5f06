//! `rename`: a stopped machine takes a new name. Its directory moves in one rename (the
//! record's `name` follows the directory, see `MachineStore::get`), its default-machine
//! pointer follows, and its address is leased again under the new name. Its disk, snapshots
//! and identity in the guest stay as they are.

use container_api::machine::{Machine, MachineState};
use container_api::system::EventAction;
use container_api::{ApiError, ErrorKind};

use crate::core::{Caller, Core};
use crate::machines::name;

impl Core {
    pub(in crate::core) async fn machine_rename(
        &self,
        caller: &Caller,
        old: &str,
        new: &str,
    ) -> Result<Machine, ApiError> {
        name::validate(new).map_err(ApiError::invalid)?;
        let (_guard, mut record) = self.lock_visible(caller, old).await?;
        if old == new {
            return Err(ApiError::invalid(format!(
                "machine `{old}` already has that name"
            )));
        }
        if self.state.vms.state(old) != MachineState::Stopped {
            return Err(ApiError::conflict(format!(
                "machine `{old}` is running; stop it first with `container machine stop {old}`"
            )));
        }
        if self.state.machines.get(new).is_ok() {
            return Err(ApiError::new(
                ErrorKind::AlreadyExists,
                format!("a machine named `{new}` already exists"),
            ));
        }
        let _new_guard = self.state.locks.lock(new).await;
        let was_default = self
            .state
            .machines
            .default_for(record.owner_uid)?
            .as_deref()
            == Some(old);
        self.state.machines.rename(old, new)?;
        record.name = new.to_string();
        if record.network != "none" {
            if let Err(e) = self.state.net.release(old) {
                tracing::warn!(machine = %old, error = %e.message, "could not release the old name's address");
            }
            match self.state.net.lease(new, record.owner_uid) {
                Ok(lease) => {
                    record.ip_address = Some(lease.ip);
                    record.mac = lease.mac;
                }
                // The next start leases one.
                Err(e) => {
                    tracing::warn!(machine = %new, error = %e.message, "no address yet for the renamed machine")
                }
            }
        } else {
            record.mac = super::mac_for(new);
        }
        self.state.machines.save(&record)?;
        if was_default {
            self.state
                .machines
                .set_default(record.owner_uid, Some(new))?;
        }
        self.state.reboots.forget(old);
        tracing::info!(machine = %new, old = %old, "machine renamed");
        let detail = Some(format!("from {old}"));
        self.emit(record.owner_uid, new, EventAction::Renamed, detail);
        self.machine(&record)
    }
}
