//! The machine network bound to the core's [`Net`] port (sticky leases, taken at create and
//! freed at rm) and to the runtime's [`TapPlumbing`] seam (a tap made before a VM's VMM
//! starts, removed after it exits).

use std::sync::Arc;

use container_api::{ApiError, ErrorKind};

use crate::core::ports::{Net, NetLease};
use crate::network::{Network, NetworkError};
use crate::runtime::{TapError, TapPlumbing};

/// A network error as the API reports it: the message with its causes.
pub fn api_error(e: NetworkError) -> ApiError {
    let kind = match &e {
        NetworkError::Exhausted { .. }
        | NetworkError::Overlap { .. }
        | NetworkError::BridgeNameTaken { .. } => ErrorKind::Conflict,
        NetworkError::InvalidSubnet(_) | NetworkError::InvalidBridgeName(_) => {
            ErrorKind::InvalidArgument
        }
        _ => ErrorKind::Internal,
    };
    ApiError::with_chain(kind, &e)
}

/// The network's leases, for the core.
#[derive(Debug)]
pub struct Leases(pub Arc<Network>);

impl Net for Leases {
    fn lease(&self, machine: &str, owner: u32) -> Result<NetLease, ApiError> {
        let lease = self.0.lease_owned(machine, owner).map_err(api_error)?;
        Ok(NetLease {
            ip: lease.ip.to_string(),
            mac: lease.mac,
        })
    }

    fn release(&self, machine: &str) -> Result<(), ApiError> {
        self.0.release(machine).map_err(api_error)?;
        Ok(())
    }
}

/// The network's taps, for the runtime.
#[derive(Debug)]
pub struct Taps(pub Arc<Network>);

#[async_trait::async_trait]
impl TapPlumbing for Taps {
    async fn attach(&self, machine: &str) -> Result<String, TapError> {
        self.0
            .attach(machine)
            .await
            .map_err(|e| TapError(Box::new(e)))
    }

    fn open(&self, tap: &str) -> Result<std::os::fd::OwnedFd, TapError> {
        crate::network::tap::open_tap(tap)
            .map(Into::into)
            .map_err(|e| TapError(Box::new(e)))
    }

    async fn detach(&self, machine: &str) {
        if let Err(e) = self.0.detach(machine).await {
            tracing::warn!(%machine, error = %e, "could not remove the machine's tap");
        }
    }
}
