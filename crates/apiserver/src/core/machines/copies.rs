//! Copies of a machine's disk: `clone` (a new machine from another's disk) and snapshots
//! (points in time a machine's disk can be brought back to). Both freeze the machine's disk
//! into a shared read-only layer through the `Vms` port (`runtime::disk` keeps the overlay
//! chains: O(1) for a stopped machine; a running one keeps running, its guest's filesystem
//! frozen for the switch) and give the other side an empty overlay over it. Snapshots are
//! overlay chains rather than qcow2 internal snapshots because a machine's top moves into
//! a shared layer at every clone: a layer is never written again, so one mechanism serves
//! both, and a snapshot's size is its layer's. Host home files (and `--mount`s) are shares,
//! never on the disk, so no snapshot or clone holds them.
//!
//! Invariant: every operation that makes, replaces or drops a layer reference holds the
//! core's disk lock (`State::disks`), and [`Core::collect_layers`] runs under it, so a
//! layer is never collected between its making and its first reference.

use std::time::Duration;

use container_api::machine::{Machine, MachineState, Snapshot};
use container_api::system::EventAction;
use container_api::{ApiError, ErrorKind};

use crate::core::{Caller, Core};
use crate::machines::{MachineRecord, SnapshotRecord, name};

impl Core {
    /// Deletes the shared disk layers nothing reads any more (after a machine, a snapshot or
    /// a machine's old top went). Failures are logged: the next collection tries again.
    pub(in crate::core) async fn collect_layers(&self) {
        let _disks = self.state.disks.lock().await;
        let roots = (|| {
            let mut roots = Vec::new();
            for r in self.state.machines.list()? {
                roots.push(self.state.machines.disk_path(&r.name));
                roots.extend(
                    self.state
                        .machines
                        .snapshots(&r.name)?
                        .into_iter()
                        .map(|s| s.layer),
                );
            }
            Ok::<_, ApiError>(roots)
        })();
        let result = match roots {
            Ok(roots) => self.state.vms.collect_layers(roots).await,
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            tracing::warn!(error = %e.message, "could not collect unused disk layers");
        }
    }

    /// A new machine `new` with the disk content and settings of `source`: its own name,
    /// address, MAC, identity (so machine-id and the user setup are new in the guest) and
    /// hostname. Left stopped.
    pub(in crate::core) async fn machine_clone(
        &self,
        caller: &Caller,
        source: &str,
        new: &str,
    ) -> Result<Machine, ApiError> {
        name::validate(new).map_err(ApiError::invalid)?;
        let (_guard, src) = self.lock_visible(caller, source).await?;
        if self.state.machines.get(new).is_ok() {
            return Err(ApiError::new(
                ErrorKind::AlreadyExists,
                format!("a machine named `{new}` already exists"),
            ));
        }
        let _slot = self.check_machine_count(src.owner_uid, new)?;
        let _new_guard = self.state.locks.lock(new).await;
        let mut record = MachineRecord {
            name: new.to_string(),
            created: chrono::Utc::now(),
            ip_address: None,
            mac: super::mac_for(new),
            pending_restart: false,
            instance: Some(crate::runtime::disk::random_id()),
            ..src.clone()
        };
        self.check_settings(&record)?;
        let disks = self.state.disks.lock().await;
        let layer = self
            .state
            .vms
            .freeze_disk(source, &self.state.machines.disk_path(source))
            .await?;
        let dir = self.state.machines.reserve(new)?;
        let made = async {
            if record.network != "none" {
                let lease = self.state.net.lease(new, record.owner_uid)?;
                record.ip_address = Some(lease.ip);
                record.mac = lease.mac;
            }
            self.state
                .vms
                .disk_from_layer(&layer, &self.state.machines.disk_path(new))
                .await?;
            self.state.machines.save(&record)?;
            self.state.machines.seal(new)?;
            Ok::<(), ApiError>(())
        }
        .await;
        drop(disks);
        if let Err(e) = made {
            let _ = std::fs::remove_dir_all(&dir);
            if record.ip_address.is_some()
                && let Err(release) = self.state.net.release(new)
            {
                tracing::warn!(machine = %new, error = %release.message, "could not release the lease of a failed clone");
            }
            return Err(e);
        }
        tracing::info!(machine = %new, source = %source, "machine cloned");
        self.emit(
            record.owner_uid,
            new,
            EventAction::Clone,
            Some(format!("from {source}")),
        );
        self.machine(&record)
    }

    fn snapshot_api(&self, machine: &str, s: &SnapshotRecord) -> Snapshot {
        Snapshot {
            name: s.name.clone(),
            machine: machine.to_string(),
            created_date: s.created,
            size: self.state.vms.disk_allocated(&s.layer),
        }
    }

    pub(in crate::core) async fn snapshot_create(
        &self,
        caller: &Caller,
        machine: &str,
        snapshot: Option<String>,
    ) -> Result<Snapshot, ApiError> {
        let now = chrono::Utc::now();
        let snap = snapshot.unwrap_or_else(|| format!("snap-{}", now.format("%Y%m%d-%H%M%S")));
        name::validate(&snap).map_err(|_| {
            ApiError::invalid(format!(
                "invalid snapshot name `{snap}`: use 1 to {} lowercase letters, digits and dashes; it must start and end with a letter or digit",
                name::MAX_NAME
            ))
        })?;
        let (_guard, owner) = self.lock_visible(caller, machine).await?;
        let mut all = self.state.machines.snapshots(machine)?;
        if all.iter().any(|s| s.name == snap) {
            return Err(ApiError::new(
                ErrorKind::AlreadyExists,
                format!("machine `{machine}` already has a snapshot named `{snap}`"),
            ));
        }
        let _disks = self.state.disks.lock().await;
        let layer = self
            .state
            .vms
            .freeze_disk(machine, &self.state.machines.disk_path(machine))
            .await?;
        let record = SnapshotRecord {
            name: snap,
            layer,
            created: now,
        };
        all.push(record.clone());
        self.state.machines.save_snapshots(machine, &all)?;
        let detail = Some(format!("created {}", record.name));
        self.emit(owner.owner_uid, machine, EventAction::Snapshot, detail);
        Ok(self.snapshot_api(machine, &record))
    }

    pub(in crate::core) fn snapshot_list(
        &self,
        caller: &Caller,
        machine: &str,
    ) -> Result<Vec<Snapshot>, ApiError> {
        self.visible(caller, machine)?;
        Ok(self
            .state
            .machines
            .snapshots(machine)?
            .iter()
            .map(|s| self.snapshot_api(machine, s))
            .collect())
    }

    fn find_snapshot(
        &self,
        machine: &str,
        snapshot: &str,
    ) -> Result<(Vec<SnapshotRecord>, usize), ApiError> {
        let all = self.state.machines.snapshots(machine)?;
        match all.iter().position(|s| s.name == snapshot) {
            Some(i) => Ok((all, i)),
            None => Err(ApiError::new(
                ErrorKind::NotFound,
                format!(
                    "machine `{machine}` has no snapshot `{snapshot}`; see `container machine snapshot ls {machine}`"
                ),
            )),
        }
    }

    /// Brings the machine's disk back to the snapshot, exactly (what was written since is
    /// dropped). The machine must be stopped, or `force` stops it.
    pub(in crate::core) async fn snapshot_restore(
        &self,
        caller: &Caller,
        machine: &str,
        snapshot: &str,
        force: bool,
    ) -> Result<Snapshot, ApiError> {
        self.visible(caller, machine)?;
        if force {
            // Before the lock, as `stop` does: a reboot seen meanwhile must not boot it.
            self.state.reboots.stop_asked(machine);
        }
        let (_guard, owner) = self.lock_visible(caller, machine).await?;
        let (all, i) = self.find_snapshot(machine, snapshot)?;
        if self.state.vms.state(machine) != MachineState::Stopped {
            if !force {
                return Err(ApiError::conflict(format!(
                    "machine `{machine}` is running; stop it first or use `container machine snapshot restore -f {machine} {snapshot}`"
                )));
            }
            self.emit(owner.owner_uid, machine, EventAction::Stopping, None);
            self.state
                .vms
                .shutdown(
                    machine,
                    None,
                    Duration::from_secs(super::DEFAULT_STOP_TIMEOUT),
                )
                .await?;
            self.emit(owner.owner_uid, machine, EventAction::Stopped, None);
        }
        {
            let _disks = self.state.disks.lock().await;
            self.state
                .vms
                .disk_from_layer(&all[i].layer, &self.state.machines.disk_path(machine))
                .await?;
        }
        self.collect_layers().await;
        let detail = Some(format!("restored {snapshot}"));
        self.emit(owner.owner_uid, machine, EventAction::Snapshot, detail);
        Ok(self.snapshot_api(machine, &all[i]))
    }

    pub(in crate::core) async fn snapshot_delete(
        &self,
        caller: &Caller,
        machine: &str,
        snapshot: &str,
    ) -> Result<Snapshot, ApiError> {
        let (_guard, owner) = self.lock_visible(caller, machine).await?;
        let (mut all, i) = self.find_snapshot(machine, snapshot)?;
        let gone = all.remove(i);
        let reply = self.snapshot_api(machine, &gone);
        {
            let _disks = self.state.disks.lock().await;
            self.state.machines.save_snapshots(machine, &all)?;
        }
        self.collect_layers().await;
        let detail = Some(format!("deleted {snapshot}"));
        self.emit(owner.owner_uid, machine, EventAction::Snapshot, detail);
        Ok(reply)
    }
}
