//! Errors of the image store: one variant per failure, each naming what failed and, where a
//! user can act, what to do. Callers map variants to their own kinds (not found, conflict…),
//! so a new failure gets a new variant rather than a new message in an old one.

/// Why an image operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("invalid image reference `{reference}`: {reason}")]
    InvalidReference { reference: String, reason: String },
    #[error("image `{0}` not found; pull it with `container image pull {0}`")]
    NotFound(String),
    #[error("registry {registry}: {message}")]
    Registry { registry: String, message: String },
    /// Every mirror of the image's registry failed, and so did the registry (`source`).
    #[error("{reference}: every mirror failed ({mirrors}), and so did its registry")]
    AllSourcesFailed {
        reference: String,
        /// Each mirror tried, with its error.
        mirrors: String,
        #[source]
        source: Box<ImageError>,
    },
    #[error("registry {registry}: {reference} not found (no such repository or tag)")]
    RemoteNotFound { registry: String, reference: String },
    #[error(
        "registry {registry} refused access (authentication required or failed): log in with \
         `container registry login {registry}`, or check the stored user name and password"
    )]
    Unauthorized { registry: String },
    #[error(
        "{what} {digest}: digest mismatch (got {actual}); the registry sent corrupt or tampered data"
    )]
    DigestMismatch {
        what: &'static str,
        digest: String,
        actual: String,
    },
    #[error("{what} {digest}: size mismatch (expected {expected} bytes, got {actual})")]
    SizeMismatch {
        what: &'static str,
        digest: String,
        expected: u64,
        actual: u64,
    },
    #[error("invalid digest `{0}`: expected sha256:<64 hex digits>")]
    InvalidDigest(String),
    #[error("malformed {what}: {message}")]
    Malformed { what: &'static str, message: String },
    /// Untrusted input over one of the store's caps: refused, and nothing of it kept.
    #[error("{what}: {size} {unit}, over the limit of {limit}; {advice}")]
    TooLarge {
        /// What is too large, and of which image or archive.
        what: String,
        size: u64,
        limit: u64,
        /// `bytes`, `members`…
        unit: &'static str,
        /// What the cap protects and what the user can do.
        advice: &'static str,
    },
    #[error("{0} has no linux/amd64 image; only linux/amd64 images can run here")]
    NoPlatform(String),
    #[error("unsupported media type `{0}`")]
    UnsupportedMediaType(String),
    #[error("refusing layer entry `{path}`: {reason}")]
    UnsafeEntry { path: String, reason: &'static str },
    #[error("reading a tar archive (truncated, corrupt or wrongly compressed data?)")]
    Archive {
        #[source]
        source: std::io::Error,
    },
    #[error("applying layer entry `{path}`: {what}")]
    Apply {
        path: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A user tried to change a name root published for everyone.
    #[error(
        "image `{0}` is a system-wide image, which only root can change (with --system); \
         a name of your own (`container image tag`) would shadow it for you alone"
    )]
    SystemImage(String),
    #[error(
        "image `{reference}` is used by machine(s) {machines}; delete them first or use --force"
    )]
    InUse { reference: String, machines: String },
    #[error("building the base disk with mkfs.ext4: {0}")]
    Mkfs(String),
    #[error("image store I/O on {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl ImageError {
    /// Maps an I/O error on `path`.
    pub fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
        move |source| ImageError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}
