//! The OCI image store: pulls images from registries over the OCI distribution protocol,
//! keeps their blobs in a verified content-addressed store, and turns each image into an ext4
//! base disk that machines' disks are overlays of. Layer archives are untrusted input: see
//! [`unpack::layer`] for how nothing in them can write outside the root being built.

pub mod archive;
pub mod content;
pub mod error;
pub mod fsutil;
pub mod manifest;
pub mod registry;
pub mod store;
pub mod unpack;

pub use error::ImageError;
pub use store::{ImageRecord, ImageStore, Progress, PullOptions, Removed};
