//! What a machine may be: one validator ([`Core::check_settings`]) for what `create` asks
//! for and what `set` changes, and `set` itself.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Mutex;

use container_api::ApiError;
use container_api::machine::{MachineState, SetReply, SetRequest};
use container_api::size::format_size;

use crate::core::{Caller, Core, over_limit};
use crate::machines::MachineRecord;

/// Smallest memory a machine may have.
const MIN_MEMORY: u64 = 256 << 20;

/// Machines a create (or clone) or a boot is under way for, as (owner, name). A
/// create holds no record until its disk is made and a boot shows no VM until QEMU runs, so
/// each limit check counts these too and claims its own machine in the same critical
/// section: two requests at once cannot both pass a limit that has room for one.
#[derive(Debug, Default)]
pub(in crate::core) struct Claims(Mutex<HashSet<(u32, String)>>);

/// A machine's place in [`Claims`], given up when dropped (the request ended: its record
/// or its VM now counts for it, or it failed).
pub(super) struct Claim<'a> {
    claims: &'a Claims,
    key: (u32, String),
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.claims
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

impl Claims {
    /// Under the claims' lock: `check` gets the names `owner` has claimed, and when it
    /// passes, `name` is claimed for `owner`.
    fn claim<'a>(
        &'a self,
        name: &str,
        owner: u32,
        check: impl FnOnce(Vec<&str>) -> Result<(), ApiError>,
    ) -> Result<Claim<'a>, ApiError> {
        let mut claimed = self.0.lock().unwrap_or_else(|p| p.into_inner());
        check(
            claimed
                .iter()
                .filter(|(o, n)| *o == owner && n != name)
                .map(|(_, n)| n.as_str())
                .collect(),
        )?;
        let key = (owner, name.to_string());
        claimed.insert(key.clone());
        Ok(Claim { claims: self, key })
    }
}

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

    /// Checks that a non-root user may have one more machine, `name`, and claims it until
    /// the claim is dropped (once its record is saved, or the create failed).
    pub(super) fn check_machine_count(
        &self,
        owner: u32,
        name: &str,
    ) -> Result<Claim<'_>, ApiError> {
        let max = self.state.config.limits.machines;
        self.state.creating.claim(name, owner, |creating| {
            if owner == 0 {
                return Ok(());
            }
            // A create's record may already be saved: each name once.
            let mut held: HashSet<String> = creating.into_iter().map(String::from).collect();
            held.extend(
                self.state
                    .machines
                    .list()?
                    .into_iter()
                    .filter(|r| r.owner_uid == owner)
                    .map(|r| r.name),
            );
            if held.len() as u64 >= u64::from(max) {
                return Err(over_limit(
                    format!("you have {} machines, the most you may have", held.len()),
                    "machines",
                ));
            }
            Ok(())
        })
    }

    /// Checks that booting `record` keeps its non-root owner's running machines within
    /// `[limits]`: their vCPUs and memory added up, machines other boots are under way for
    /// included. Claims `record` as booting until the claim is dropped (once its VM is up or
    /// the boot failed).
    pub(super) fn check_running_totals(
        &self,
        record: &MachineRecord,
    ) -> Result<Claim<'_>, ApiError> {
        self.state
            .booting
            .claim(&record.name, record.owner_uid, |booting| {
                self.running_totals_allow(record, &booting)
            })
    }

    fn running_totals_allow(
        &self,
        record: &MachineRecord,
        booting: &[&str],
    ) -> Result<(), ApiError> {
        if record.owner_uid == 0 {
            return Ok(());
        }
        let limits = &self.state.config.limits;
        let (mut cpus, mut memory) = (record.cpus, record.memory);
        for r in self.state.machines.list()? {
            if r.owner_uid == record.owner_uid
                && r.name != record.name
                && (self.state.vms.state(&r.name) != MachineState::Stopped
                    || booting.contains(&r.name.as_str()))
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
