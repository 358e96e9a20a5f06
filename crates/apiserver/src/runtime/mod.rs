//! The VM runtime: machine disks, the kernel and initramfs, the QEMU microvm runner with its
//! helper processes, and their supervision.

pub mod disk;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use container_api::ApiError;
use container_api::machine::MachineState;
use tokio::io::AsyncRead;

use crate::config::Config;
use crate::core::ServiceOptions;
use crate::core::ports::{BootSpec, ClientStream, ExecSpec, Vms};

/// The runtime behind the core's `Vms` port.
#[derive(Debug)]
pub struct Runtime {
    root: PathBuf,
}

/// The runtime of a running service.
pub fn vms(options: &ServiceOptions, _config: &Config) -> anyhow::Result<Arc<dyn Vms>> {
    Ok(Arc::new(Runtime {
        root: options.root.clone(),
    }))
}

fn not_yet() -> ApiError {
    ApiError::new(
        container_api::ErrorKind::Unavailable,
        "booting machines is not available in this build yet",
    )
}

#[async_trait]
impl Vms for Runtime {
    async fn create_disk(&self, base: &Path, disk: &Path, size: u64) -> Result<(), ApiError> {
        let (base, disk) = (base.to_path_buf(), disk.to_path_buf());
        tokio::task::spawn_blocking(move || disk::create_overlay(&base, &disk, size))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?
    }
    async fn grow_disk(&self, disk: &Path, size: u64) -> Result<(), ApiError> {
        let disk = disk.to_path_buf();
        tokio::task::spawn_blocking(move || disk::grow(&disk, size))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?
    }
    fn disk_allocated(&self, disk: &Path) -> u64 {
        disk::allocated(disk)
    }
    async fn boot(&self, _spec: BootSpec) -> Result<(), ApiError> {
        Err(not_yet())
    }
    async fn shutdown(&self, _: &str, _: Option<i32>, _: Duration) -> Result<(), ApiError> {
        Ok(())
    }
    fn state(&self, _name: &str) -> MachineState {
        MachineState::Stopped
    }
    fn started(&self, _name: &str) -> Option<chrono::DateTime<chrono::Utc>> {
        None
    }
    async fn exec(&self, _: &str, _: ExecSpec, _: Box<dyn ClientStream>) -> Result<(), ApiError> {
        Err(not_yet())
    }
    async fn copy_in(
        &self,
        _: &str,
        _: &str,
        _: Box<dyn AsyncRead + Send + Unpin>,
    ) -> Result<(), ApiError> {
        Err(not_yet())
    }
    async fn copy_out(
        &self,
        _: &str,
        _: &str,
    ) -> Result<Box<dyn AsyncRead + Send + Unpin>, ApiError> {
        Err(not_yet())
    }
    fn log_path(&self, name: &str, boot: bool) -> PathBuf {
        let file = if boot { "boot.log" } else { "console.log" };
        self.root.join("machines").join(name).join(file)
    }
}
