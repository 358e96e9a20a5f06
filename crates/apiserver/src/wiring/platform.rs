//! The core's [`Platform`] port: the accelerator QEMU would use (`runtime::qemu`) and the
//! kernels installed under the service root (`runtime::kernel`).

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use container_api::ApiError;
use container_api::system::{KernelInfo, KernelSetRequest};

use crate::config::Virtualization;
use crate::core::ports::Platform;
use crate::runtime;

/// The host's accelerator and the kernels under `root`.
#[derive(Debug)]
pub struct HostPlatform {
    pub root: PathBuf,
    pub virtualization: Virtualization,
}

#[async_trait]
impl Platform for HostPlatform {
    fn virtualization(&self) -> String {
        runtime::qemu::detect_accel(self.virtualization).reason
    }

    fn kernel(&self) -> Option<KernelInfo> {
        runtime::kernel::current(&self.root)
    }

    async fn set_kernel(&self, req: KernelSetRequest) -> Result<KernelInfo, ApiError> {
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || {
            if req.recommended {
                return Ok(runtime::kernel::fetch_recommended(&root)?);
            }
            let binary = req
                .binary
                .ok_or_else(|| ApiError::invalid("give --binary PATH or --recommended"))?;
            Ok::<_, ApiError>(runtime::kernel::install(
                &root,
                Path::new(&binary),
                req.modules.as_deref().map(Path::new),
                None,
            )?)
        })
        .await
        .map_err(|e| ApiError::internal(format!("kernel task failed: {e}")))?
    }
}
