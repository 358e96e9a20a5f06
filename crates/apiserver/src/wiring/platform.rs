//! The core's [`Platform`] port: the accelerator QEMU would use (`runtime::qemu`) and the
//! kernels installed under the service root (`runtime::kernel`), the recommended one
//! installed on first use, once however many boots ask at the same time.

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
    /// Held while the recommended kernel is installed on first use.
    pub first_install: tokio::sync::Mutex<()>,
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

    async fn ensure_kernel(&self) -> Result<Option<KernelInfo>, ApiError> {
        let _one_at_a_time = self.first_install.lock().await;
        if runtime::kernel::current(&self.root).is_some() {
            return Ok(None);
        }
        tracing::info!("no kernel installed: installing the recommended one");
        let root = self.root.clone();
        let info = tokio::task::spawn_blocking(move || runtime::kernel::fetch_recommended(&root))
            .await
            .map_err(|e| ApiError::internal(format!("kernel task failed: {e}")))??;
        tracing::info!(version = %info.version, "kernel installed");
        Ok(Some(info))
    }
}
