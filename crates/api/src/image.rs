//! Image API types: what `image ls`, `image inspect` and `image pull` return.
//!
//! Image names are per user: each uid has its own names, and root publishes system-wide ones
//! (`system: true` in a request) that every user reads but only root changes. A user's lookup
//! reads their own names, then the system's.

use serde::{Deserialize, Serialize};

/// One row of `image ls`: one reference (name:tag) to one image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageSummary {
    /// Full reference, e.g. `127.0.0.1:5000/debian:12`.
    pub reference: String,
    /// Manifest digest (`sha256:…`).
    pub digest: String,
    /// Sum of the compressed blob sizes in bytes.
    pub size: u64,
    pub created: Option<chrono::DateTime<chrono::Utc>>,
    /// Whether the image has an executable `/sbin/init` (known once unpacked).
    pub has_init: Option<bool>,
    /// The uid whose own name this is; `None` for a system-wide name, which root publishes
    /// and every user reads.
    #[serde(default)]
    pub owner: Option<u32>,
}

impl ImageSummary {
    /// Whether this is a system-wide name (root's to change, everyone's to read).
    pub fn is_system(&self) -> bool {
        self.owner.is_none()
    }
}

/// `image inspect`: everything the store knows about an image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageDetail {
    pub references: Vec<String>,
    pub digest: String,
    pub media_type: String,
    pub os: String,
    pub architecture: String,
    pub size: u64,
    pub created: Option<chrono::DateTime<chrono::Utc>>,
    pub has_init: Option<bool>,
    pub stop_signal: Option<String>,
    pub layers: Vec<LayerInfo>,
    /// The image configuration (`config` of the OCI image config), as stored.
    pub config: serde_json::Value,
    /// The ext4 base disk machines are created from, once built.
    pub base_disk: Option<BaseDiskInfo>,
    /// Where the image was pulled from; absent for a loaded image.
    #[serde(default)]
    pub source: Option<ImageSource>,
}

/// Where an image was pulled from: the registry, or the mirror of it that served it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageSource {
    /// The reference as it was fetched (`mirror.example:5000/library/alpine:latest`).
    pub reference: String,
    /// Whether that was a mirror of the image's registry.
    pub mirror: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LayerInfo {
    pub digest: String,
    pub media_type: String,
    pub size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BaseDiskInfo {
    pub path: String,
    /// Bytes allocated on the host (never the apparent size).
    pub allocated: u64,
}

/// `POST /v1/images/pull` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PullRequest {
    pub reference: String,
    /// Record the name as a system-wide image (root only).
    #[serde(default)]
    pub system: bool,
}

/// `POST /v1/images/push` body: an image the caller sees, sent to the registry its reference
/// names. The answer streams [`PullEvent`]s, as a pull's does.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushRequest {
    pub reference: String,
}

/// One line of the NDJSON stream a pull (or a push) answers with.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum PullEvent {
    /// The reference resolved to this manifest; `layers` blobs will be fetched.
    Resolved { digest: String, layers: usize },
    /// Bytes of one blob arrived (`current` of `total`).
    Progress {
        digest: String,
        current: u64,
        total: u64,
    },
    /// A blob is complete (downloaded and verified, or already present).
    BlobDone { digest: String, cached: bool },
    /// A long step with no byte count started (e.g. "building base disk").
    Step { message: String },
    /// The pull finished.
    Done { image: ImageSummary },
    /// The pull failed; nothing partial was recorded.
    Error { error: crate::ApiError },
}

/// `POST /v1/images/tag` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TagRequest {
    pub source: String,
    pub target: String,
    /// Write `target` as a system-wide name (root only); `source` resolves as root sees it.
    #[serde(default)]
    pub system: bool,
}

/// `DELETE /v1/images/{ref}` and `POST /v1/images/prune` answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RemoveReport {
    pub untagged: Vec<String>,
    pub deleted: Vec<String>,
    pub freed_bytes: u64,
}

/// `POST /v1/registry/login` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub server: String,
    pub username: String,
    pub password: String,
}
