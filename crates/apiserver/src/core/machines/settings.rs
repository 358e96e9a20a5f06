//! What a machine may be: one validator ([`Core::check_settings`]) for what `create` asks
//! for and what `set` changes, and `set` itself.

use std::path::Path;

use container_api::ApiError;
use container_api::machine::{MachineState, SetReply, SetRequest};
use container_api::size::format_size;

use crate::core::{Caller, Core};
use crate::machines::MachineRecord;

/// Smallest memory a machine may have.
const MIN_MEMORY: u64 = 256 << 20;
/// Most vCPUs a machine may have.
const MAX_CPUS: u32 = 64;

impl Core {
    /// Checks the settings of a machine about to be created or changed: the one place that
    /// says what a machine may be.
    pub(super) fn check_settings(&self, record: &MachineRecord) -> Result<(), ApiError> {
        if record.cpus == 0 || record.cpus > MAX_CPUS {
            return Err(ApiError::invalid(format!(
                "cpus must be between 1 and {MAX_CPUS}, got {}",
                record.cpus
            )));
        }
        if record.memory < MIN_MEMORY {
            return Err(ApiError::invalid(format!(
                "memory must be at least {}, got {}",
                format_size(MIN_MEMORY),
                format_size(record.memory)
            )));
        }
        if let Some(k) = &record.kernel
            && !self.state.host.is_file(Path::new(k))
        {
            return Err(ApiError::invalid(format!("kernel {k} is not a file")));
        }
        Ok(())
    }

    pub(in crate::core) async fn machine_set(
        &self,
        caller: &Caller,
        name: &str,
        settings: SetRequest,
    ) -> Result<SetReply, ApiError> {
        let record = self.visible(caller, name)?;
        if settings.is_empty() {
            return Err(ApiError::invalid(format!(
                "give at least one KEY=VALUE; keys: {}",
                SetRequest::KEYS
            )));
        }
        let _guard = self.state.locks.lock(name).await;
        let mut new = record.clone();
        if let Some(cpus) = settings.cpus {
            new.cpus = cpus;
        }
        if let Some(memory) = settings.memory {
            new.memory = memory;
        }
        if let Some(home_mount) = settings.home_mount {
            new.home_mount = home_mount;
        }
        if let Some(kernel) = settings.kernel {
            new.kernel = Some(kernel).filter(|k| !k.is_empty());
        }
        if let Some(size) = settings.disk_size {
            if size < record.disk_size {
                return Err(ApiError::invalid(format!(
                    "disk-size can only grow (now {}); shrinking would lose data",
                    format_size(record.disk_size)
                )));
            }
            new.disk_size = size;
        }
        self.check_settings(&new)?;
        let running = self.state.vms.state(name) != MachineState::Stopped;
        if new.disk_size > record.disk_size {
            if running {
                return Err(ApiError::conflict(format!(
                    "disk-size can only change while `{name}` is stopped; run `container machine stop {name}` first"
                )));
            }
            let disk = self.state.machines.disk_path(name);
            self.state.vms.grow_disk(&disk, new.disk_size).await?;
        }
        new.pending_restart = running && new != record;
        self.state.machines.save(&new)?;
        Ok(SetReply {
            takes_effect_at_next_start: running,
            machine: self.machine(&new)?,
        })
    }
}
