//! What a machine may be: one validator ([`Core::check_settings`]) for what `create` asks
//! for and what `set` changes, and `set` itself.

use std::path::Path;

use container_api::ApiError;
use container_api::machine::{MachineState, SetReply, SetRequest};
use container_api::size::format_size;

use crate::core::{Caller, Core, over_limit};
use crate::machines::MachineRecord;

/// Smallest memory a machine may have.
const MIN_MEMORY: u64 = 256 << 20;

impl Core {
    /// Checks the settings of a machine about to be created or changed: the one place that
    /// says what a machine may be. Nobody gets more CPUs or memory than the host has; a
    /// non-root owner's disk stays within `[limits]`.
    pub(super) fn check_settings(&self, record: &MachineRecord) -> Result<(), ApiError> {
        let host = &self.state.config.host;
        if record.cpus == 0 || record.cpus > host.cpus {
            return Err(ApiError::invalid(format!(
                "cpus must be between 1 and {} (the host's CPUs), got {}",
                host.cpus, record.cpus
            )));
        }
        if record.memory < MIN_MEMORY || record.memory > host.memory {
            return Err(ApiError::invalid(format!(
                "memory must be between {} and {} (the host's memory), got {}",
                format_size(MIN_MEMORY),
                format_size(host.memory),
                format_size(record.memory)
            )));
        }
        let limits = &self.state.config.limits;
        if record.owner_uid != 0 && record.disk_size > limits.disk_size {
            return Err(over_limit(
                format!(
                    "disk-size {} is over {}",
                    format_size(record.disk_size),
                    format_size(limits.disk_size)
                ),
                "disk-size",
            ));
        }
        if let Some(k) = &record.kernel
            && !self.state.host.is_file(Path::new(k))
        {
            return Err(ApiError::invalid(format!("kernel {k} is not a file")));
        }
        Ok(())
    }

    /// Checks that a non-root user may have one more machine.
    pub(super) fn check_machine_count(&self, owner: u32) -> Result<(), ApiError> {
        let max = self.state.config.limits.machines;
        if owner == 0 {
            return Ok(());
        }
        let held = self.state.machines.list()?;
        let held = held.iter().filter(|r| r.owner_uid == owner).count();
        if held as u64 >= u64::from(max) {
            return Err(over_limit(
                format!("you have {held} machines, the most you may have"),
                "machines",
            ));
        }
        Ok(())
    }

    /// Checks that booting `record` keeps its non-root owner's running machines within
    /// `[limits]`: their vCPUs and memory added up.
    pub(super) fn check_running_totals(&self, record: &MachineRecord) -> Result<(), ApiError> {
        if record.owner_uid == 0 {
            return Ok(());
        }
        let limits = &self.state.config.limits;
        let (mut cpus, mut memory) = (record.cpus, record.memory);
        for r in self.state.machines.list()? {
            if r.owner_uid == record.owner_uid
                && r.name != record.name
                && self.state.vms.state(&r.name) != MachineState::Stopped
            {
                cpus += r.cpus;
                memory += r.memory;
            }
        }
        if cpus > limits.running_cpus {
            return Err(over_limit(
                format!(
                    "starting `{}` would give your running machines {cpus} vCPUs, over {}",
                    record.name, limits.running_cpus
                ),
                "running-cpus",
            ));
        }
        if memory > limits.running_memory {
            return Err(over_limit(
                format!(
                    "starting `{}` would give your running machines {} of memory, over {}",
                    record.name,
                    format_size(memory),
                    format_size(limits.running_memory)
                ),
                "running-memory",
            ));
        }
        Ok(())
    }

    pub(in crate::core) async fn machine_set(
        &self,
        caller: &Caller,
        name: &str,
        settings: SetRequest,
    ) -> Result<SetReply, ApiError> {
        if settings.is_empty() {
            return Err(ApiError::invalid(format!(
                "give at least one KEY=VALUE; keys: {}",
                SetRequest::KEYS
            )));
        }
        let (_guard, record) = self.lock_visible(caller, name).await?;
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
        if let Some(autostart) = settings.autostart {
            new.autostart = autostart;
        }
        if let Some(forward) = settings.forward_ports {
            new.forward_ports = forward;
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
        // Autostart and port forwarding are the service's business, never the VM's: they
        // need no restart (forwarding changes at once).
        let vm_changed = MachineRecord {
            autostart: record.autostart,
            forward_ports: record.forward_ports,
            ..new.clone()
        } != record;
        new.pending_restart = running && vm_changed;
        self.state.machines.save(&new)?;
        if running && new.forward_ports != record.forward_ports {
            self.state
                .vms
                .forward_ports(name, super::forwards::plan(&new));
        }
        Ok(SetReply {
            takes_effect_at_next_start: running && vm_changed,
            machine: self.machine(&new)?,
        })
    }
}
