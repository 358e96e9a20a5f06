//! The OCI image store: pulls images from registries over the OCI distribution protocol,
//! keeps their blobs in a verified content-addressed store, and turns each image into an ext4
//! base disk that machines' disks are overlays of. Layer archives are untrusted input: see
//! [`unpack::layer`] for how nothing in them can write outside the root being built.
//!
//! Entry point: [`ImageStore`]. Its async [`ImageStore::pull`] may be called from any tokio
//! runtime; every other method blocks (file I/O, `mkfs.ext4`) and belongs in
//! `spawn_blocking` when called from async code.

pub mod archive;
pub mod commit;
pub mod content;
pub mod error;
pub mod fsutil;
pub mod gc;
pub mod manifest;
pub mod pull;
pub mod push;
pub mod registry;
pub mod store;
pub mod unpack;

pub use error::ImageError;
pub use manifest::ConfigInfo;
pub use registry::{Credentials, Mirror, parse_reference};
pub use store::{
    DEFAULT_MAX_UNPACKED_BYTES, Hold, ImageRecord, ImageSource, ImageStore, LayerRecord, Limits,
    Namespace, Progress, PullOptions, PullProgress, Removed,
};
pub use unpack::DiskInfo;
