//! The container service: one typed request enum is the only door into its core; the HTTP
//! layer translates. See docs/ARCHITECTURE.md.

pub mod config;
pub mod core;
pub use container_image::fsutil;
pub mod http;
pub mod logs;
pub mod machines;
pub mod manager;
pub mod network;
pub mod runtime;
pub mod wiring;
