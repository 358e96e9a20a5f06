//! System requests: status, properties and the kernel.

use container_api::machine::MachineState;
use container_api::system::{KernelInfo, KernelSetRequest, SystemStatus};
use container_api::{ApiError, ErrorKind};

use super::{Caller, Core};
use crate::runtime;

impl Core {
    pub(super) fn status(&self) -> SystemStatus {
        let o = &self.state.options;
        let machines = self.state.machines.list().unwrap_or_default();
        let running = machines
            .iter()
            .filter(|m| self.state.vms.state(&m.name) == MachineState::Running)
            .count();
        SystemStatus {
            status: "running".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            api_version: "v1".into(),
            pid: std::process::id(),
            root: o.root.display().to_string(),
            socket: o.socket.display().to_string(),
            started: self.state.started,
            virtualization: runtime::qemu::detect_accel(self.state.config.runtime.virtualization)
                .reason,
            kernel: runtime::kernel::current(&o.root),
            images: self.state.store.list().map(|l| l.len()).unwrap_or(0),
            machines: machines.len(),
            machines_running: running,
        }
    }

    /// Installs the kernel machines boot (root only: it reads host paths as the service).
    pub(super) async fn kernel_set(
        &self,
        caller: &Caller,
        req: KernelSetRequest,
    ) -> Result<KernelInfo, ApiError> {
        if !caller.is_root() {
            return Err(ApiError::new(
                ErrorKind::PermissionDenied,
                "only root can set the kernel",
            ));
        }
        let root = self.state.options.root.clone();
        tokio::task::spawn_blocking(move || {
            if req.recommended {
                runtime::kernel::fetch_recommended(&root).map_err(ApiError::from)
            } else {
                let binary = req
                    .binary
                    .ok_or_else(|| ApiError::invalid("give --binary PATH or --recommended"))?;
                runtime::kernel::install(
                    &root,
                    std::path::Path::new(&binary),
                    req.modules.as_deref().map(std::path::Path::new),
                    None,
                )
                .map_err(ApiError::from)
            }
        })
        .await
        .map_err(|e| ApiError::internal(format!("kernel task failed: {e}")))?
    }
}
