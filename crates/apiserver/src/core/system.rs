//! System requests: status, disk usage, properties and the kernel.

use std::collections::BTreeSet;

use container_api::system::{DiskUsage, KernelInfo, KernelSetRequest, SystemStatus, UsageRow};
use container_api::{ApiError, ErrorKind};

use super::images::{prunable, used_by_visible};
use super::ports::Namespace;
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

    /// `system df`: what the images the caller sees and the machines they see take on disk;
    /// reclaimable is what `image prune --all` would free, and the stopped machines' disks.
    pub(super) async fn disk_usage(&self, caller: &Caller) -> Result<DiskUsage, ApiError> {
        let ns = Namespace::User(caller.uid);
        let in_use = self.images_in_use(caller)?;
        let images = self.state.images.list(ns).await?;
        let untag = prunable(ns, &images, &in_use)
            .map(|i| i.reference.clone())
            .collect();
        let digests: BTreeSet<&str> = images.iter().map(|i| i.digest.as_str()).collect();
        let active = digests
            .iter()
            .filter(|d| used_by_visible(&in_use, d))
            .count();
        let held = self.state.images.usage(ns, untag, in_use.clone()).await?;
        let mut machines = UsageRow::default();
        for m in self.machine_list(caller)? {
            let snapshots: u64 = self
                .state
                .machines
                .snapshots(&m.id)
                .unwrap_or_default()
                .iter()
                .map(|s| self.state.vms.disk_allocated(&s.layer))
                .sum();
            let size = m.disk_allocated + snapshots;
            machines.total += 1;
            machines.size += size;
            match m.status.is_up() {
                true => machines.active += 1,
                false => machines.reclaimable += size,
            }
        }
        Ok(DiskUsage {
            images: UsageRow {
                total: digests.len() as u64,
                active: active as u64,
                size: held.bytes,
                reclaimable: held.reclaimable,
            },
            machines,
        })
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
