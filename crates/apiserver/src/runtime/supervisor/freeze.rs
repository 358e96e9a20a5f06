//! Point-in-time copies of a VM's disk ([`Runtime::freeze_disk`]): the disk's current top
//! becomes a shared read-only layer (`disk::freeze_top`) and the VM, stopped or running,
//! goes on over an empty overlay. For a running VM the guest's filesystem is frozen by the
//! agent (FIFREEZE) around QMP's `blockdev-snapshot-sync`, so the layer holds a clean
//! filesystem and the guest never stops; writes block for the moment the switch takes.

use std::path::Path;
use std::time::Duration;

use container_agent_proto as proto;
use container_api::machine::MachineState;

use super::Runtime;
use crate::runtime::{RuntimeError, disk};

/// The longest the guest may stay frozen if this side vanishes mid-way.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(20);

impl Runtime {
    /// Freezes the disk `disk` of VM `id` into the new shared layer `layer`, whether the VM
    /// runs or not. On failure the disk is as it was.
    pub async fn freeze_disk(
        &self,
        id: &str,
        disk: &Path,
        layer: &Path,
    ) -> Result<(), RuntimeError> {
        let (d, l) = (disk.to_path_buf(), layer.to_path_buf());
        let running = match self.status(id) {
            MachineState::Stopped => None,
            // A booting machine's agent answers already; its init need not have finished.
            MachineState::Running | MachineState::Booting => self.get(id),
            MachineState::Unresponsive => return Err(RuntimeError::Unresponsive(id.to_string())),
            _ => return Err(RuntimeError::Changing(id.to_string())),
        };
        let Some(vm) = running else {
            return blocking(move || disk::freeze_top(&d, &l)).await;
        };
        blocking(move || disk::freeze_top(&d, &l)).await?;
        let undo = || {
            let (d, l) = (disk.to_path_buf(), layer.to_path_buf());
            blocking(move || disk::thaw_top(&d, &l))
        };
        let frozen = async {
            proto::client::AgentClient::connect(&vm.agent_socket(), proto::PORT)
                .await?
                .freeze(FREEZE_TIMEOUT)
                .await
        }
        .await;
        let frozen = match frozen {
            Ok(f) => f,
            Err(source) => {
                undo().await?;
                return Err(RuntimeError::Freeze {
                    machine: id.to_string(),
                    source,
                });
            }
        };
        let switched = self.0.vmm.switch_disk(&vm.control_socket(), disk).await;
        if let Err(e) = frozen.thaw().await {
            // The agent thaws by itself when the session ends, which it now has.
            tracing::warn!(machine = %id, error = %e, "the guest did not confirm the thaw");
        }
        if let Err(source) = switched {
            undo().await?;
            return Err(RuntimeError::SwitchDisk {
                machine: id.to_string(),
                source,
            });
        }
        tracing::info!(machine = %id, layer = %layer.display(), "disk frozen while running");
        Ok(())
    }
}

async fn blocking(
    f: impl FnOnce() -> Result<(), RuntimeError> + Send + 'static,
) -> Result<(), RuntimeError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RuntimeError::CommandFailed {
            what: "a disk operation".into(),
            stderr: e.to_string(),
        })?
}
