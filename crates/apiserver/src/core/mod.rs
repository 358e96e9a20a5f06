//! The service core. [`Request`] is the only way in: the HTTP layer, tests and fuzzers all
//! build one and call [`Core::handle`], which checks who is asking ([`Caller`]) and answers
//! with a [`Reply`] or an [`ApiError`]. Operations that stream (pull progress, archives,
//! interactive sessions) carry their channel inside the request.

mod system;

use std::path::PathBuf;
use std::sync::Arc;

use container_api::ApiError;
use container_api::system::{Property, SystemStatus};
use serde::Serialize;
use tokio::sync::Notify;

use crate::config::Config;

/// Who is calling, from the socket's peer credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

impl Caller {
    pub fn is_root(&self) -> bool {
        self.uid == 0
    }
}

/// Everything the core can be asked to do.
#[derive(Debug)]
pub enum Request {
    SystemStatus,
    SystemProperties,
    /// Stop the service; machines keep running.
    SystemShutdown,
}

/// What the core answers; serialised as the variant's content.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Reply {
    Status(Box<SystemStatus>),
    Properties(Vec<Property>),
    Empty {},
}

/// Paths and settings the service was started with.
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    pub root: PathBuf,
    pub run_dir: PathBuf,
    pub socket: PathBuf,
}

struct State {
    options: ServiceOptions,
    config: Config,
    started: chrono::DateTime<chrono::Utc>,
    shutdown: Notify,
}

/// The service core; cheap to clone.
#[derive(Clone)]
pub struct Core {
    state: Arc<State>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("root", &self.state.options.root)
            .finish_non_exhaustive()
    }
}

impl Core {
    /// Opens the stores under `options.root` and readies the core.
    pub async fn open(options: ServiceOptions, config: Config) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&options.root)?;
        std::fs::create_dir_all(&options.run_dir)?;
        Ok(Self {
            state: Arc::new(State {
                options,
                config,
                started: chrono::Utc::now(),
                shutdown: Notify::new(),
            }),
        })
    }

    /// The single entry point.
    pub async fn handle(&self, caller: &Caller, request: Request) -> Result<Reply, ApiError> {
        tracing::debug!(uid = caller.uid, ?request, "request");
        match request {
            Request::SystemStatus => Ok(Reply::Status(Box::new(self.status()))),
            Request::SystemProperties => {
                Ok(Reply::Properties(self.state.config.properties.clone()))
            }
            Request::SystemShutdown => {
                if !caller.is_root() {
                    return Err(ApiError::new(
                        container_api::ErrorKind::PermissionDenied,
                        "only root can stop the container service",
                    ));
                }
                self.state.shutdown.notify_waiters();
                Ok(Reply::Empty {})
            }
        }
    }

    /// Resolves when a shutdown was requested through the API.
    pub async fn shutdown_requested(&self) {
        self.state.shutdown.notified().await
    }

    pub fn config(&self) -> &Config {
        &self.state.config
    }

    pub fn options(&self) -> &ServiceOptions {
        &self.state.options
    }
}
