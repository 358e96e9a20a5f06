//! System requests: status, properties and the kernel.

use container_api::system::{KernelInfo, KernelSetRequest, SystemStatus};
use container_api::{ApiError, ErrorKind};

use super::{Caller, Core};

impl Core {
    pub(super) async fn status(&self) -> SystemStatus {
        let o = &self.state.options;
        let machines = self.state.machines.list().unwrap_or_default();
        let running = machines
            .iter()
            .filter(|m| self.state.vms.state(&m.name).is_up())
            .count();
        SystemStatus {
            status: "running".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            api_version: "v1".into(),
            pid: std::process::id(),
            root: o.root.display().to_string(),
            socket: o.socket.display().to_string(),
            started: self.state.started,
            virtualization: self.state.platform.virtualization(),
            kernel: self.state.platform.kernel(),
            images: self
                .state
                .images
                .list_all()
                .await
                .map(|l| l.len())
                .unwrap_or(0),
            machines: machines.len(),
            machines_running: running,
            run_by: crate::manager::run_by(),
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
        self.state.platform.set_kernel(req).await
    }
}
