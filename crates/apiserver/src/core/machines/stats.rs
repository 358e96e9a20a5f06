//! `stats` and the figures `inspect` carries: what each machine costs the host and holds
//! inside, sampled now. A CPU rate needs two samples of the same VM; machines seen for the
//! first time (or long ago) are sampled again after [`SECOND_SAMPLE_AFTER`], as `docker
//! stats --no-stream` does, so every answer carries a rate.

use std::time::Duration;

use container_api::ApiError;
use container_api::machine::MachineState;
use container_api::stats::{DiskUsage, MachineStats};

use super::super::{Caller, Core};
use crate::machines::MachineRecord;

/// The wait before the second sample of a VM that had no recent one.
const SECOND_SAMPLE_AFTER: Duration = Duration::from_millis(500);

impl Core {
    /// Figures of the caller's machines: the named ones (each must be visible), else every
    /// running one (`all`: stopped ones too).
    pub(in crate::core) async fn machine_stats(
        &self,
        caller: &Caller,
        names: &[String],
        all: bool,
    ) -> Result<Vec<MachineStats>, ApiError> {
        let records: Vec<MachineRecord> = match names.is_empty() {
            true => self
                .state
                .machines
                .list()?
                .into_iter()
                .filter(|r| caller.is_root() || r.owner_uid == caller.uid)
                .filter(|r| all || self.state.vms.state(&r.name) != MachineState::Stopped)
                .collect(),
            false => names
                .iter()
                .map(|n| self.visible(caller, n))
                .collect::<Result<_, _>>()?,
        };
        let mut stats = futures::future::join_all(records.iter().map(|r| self.sample(r))).await;
        let again: Vec<usize> = (0..stats.len())
            .filter(|&i| stats[i].host_memory.is_some() && stats[i].cpu_percent.is_none())
            .collect();
        if !again.is_empty() {
            tokio::time::sleep(SECOND_SAMPLE_AFTER).await;
            let second =
                futures::future::join_all(again.iter().map(|&i| self.sample(&records[i]))).await;
            for (i, s) in again.into_iter().zip(second) {
                stats[i] = s;
            }
        }
        Ok(stats)
    }

    /// One sample of a machine; only the disk's figures while it is stopped.
    pub(super) async fn sample(&self, record: &MachineRecord) -> MachineStats {
        let vms = &self.state.vms;
        let disk = self.state.machines.disk_path(&record.name);
        let vm = vms.stats(&record.name).await;
        MachineStats {
            id: record.name.clone(),
            status: vms.state(&record.name).shown().0,
            cpu_percent: vm.as_ref().and_then(|v| v.cpu_percent),
            cpu_time_ns: vm.as_ref().map(|v| v.cpu_time_ns),
            guest_memory: vm.as_ref().and_then(|v| v.guest_memory),
            network: vm.as_ref().and_then(|v| v.network),
            host_memory: vm.map(|v| v.host_memory),
            disk: DiskUsage {
                allocated: vms.disk_allocated(&disk),
                size: record.disk_size,
            },
        }
    }
}
