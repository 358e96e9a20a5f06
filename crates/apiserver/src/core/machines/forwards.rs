//! Which host ports a machine's VM gets while it runs: the guest's listening ports unless
//! `forward-ports=off`, and its published ports always. The runtime does the forwarding
//! (`Vms::forward_ports`); the core says what, at each boot, at each `set forward-ports`
//! and, for the machines a restarted service adopted, at service start.

use container_api::ApiError;
use container_api::machine::MachineState;
use container_api::ports::PortForward;

use crate::core::ports::PortsPlan;
use crate::core::{Caller, Core};
use crate::machines::MachineRecord;

/// What `record`'s VM forwards; `None` when nothing.
pub(super) fn plan(record: &MachineRecord) -> Option<PortsPlan> {
    (record.forward_ports || !record.publish.is_empty()).then(|| PortsPlan {
        watch: record.forward_ports,
        publish: record.publish.clone(),
    })
}

impl Core {
    /// Forwards the ports of every machine whose VM runs (adopted at service start). Call
    /// once at service start, after running machines were adopted.
    pub fn forward_all(&self) {
        let Ok(records) = self.state.machines.list() else {
            return;
        };
        for record in records {
            if self.state.vms.state(&record.name) != MachineState::Stopped {
                self.state.vms.forward_ports(&record.name, plan(&record));
            }
        }
    }

    /// The host ports forwarded to a machine now (none while it is stopped).
    pub(in crate::core) fn machine_ports(
        &self,
        caller: &Caller,
        name: &str,
    ) -> Result<Vec<PortForward>, ApiError> {
        let record = self.visible(caller, name)?;
        Ok(self.state.vms.ports(&record.name))
    }
}
