//! The contract between the `container` CLI and the `container-apiserver` service: the JSON
//! types of the versioned HTTP API (`/v1`), its error model, and a client that speaks it over
//! the service's Unix socket. The OpenAPI document in `docs/api/openapi.yaml` describes the
//! same types; keep them in step.

pub mod client;
pub mod error;
pub mod image;
pub mod machine;
pub mod paths;
pub mod ports;
pub mod session;
pub mod size;
pub mod stats;
pub mod system;

pub use client::Client;
pub use error::{ApiError, ErrorKind, ExitCode};

/// The API version prefix every route lives under.
pub const API_PREFIX: &str = "/v1";
