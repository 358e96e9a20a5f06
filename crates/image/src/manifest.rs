//! Parsing of manifests, indexes and image configs: untrusted JSON from registries and
//! archives, bounded in size and checked for the fields the store relies on.

use oci_client::manifest::{OciImageIndex, OciImageManifest};
use serde::{Deserialize, Serialize};

use crate::content::digest_hex;
use crate::error::ImageError;

/// Largest manifest, index or config accepted: what containerd reads at most and
/// distribution accepts on push (the OCI distribution spec's portable size is 4 MB).
pub const MAX_JSON: u64 = 4 << 20;

/// What a user reads when a manifest, index or config is over [`MAX_JSON`].
const JSON_ADVICE: &str = "registries and image tools keep manifests and configs under 4 MiB, \
     so this image is broken or hostile and cannot be used; use another image";

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const ACCEPTED: &[&str] = &[OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// The compression a layer media type names.
pub fn layer_compression(media_type: &str) -> Result<Compression, ImageError> {
    let base = media_type.replace(".nondistributable", "");
    match base.as_str() {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.docker.image.rootfs.diff.tar" => Ok(Compression::None),
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip"
        | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Ok(Compression::Gzip),
        "application/vnd.oci.image.layer.v1.tar+zstd"
        | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Ok(Compression::Zstd),
        _ => Err(ImageError::UnsupportedMediaType(media_type.to_string())),
    }
}

/// A manifest or an index, told apart by media type or shape.
#[derive(Debug)]
pub enum Parsed {
    Manifest(Box<OciImageManifest>),
    Index(OciImageIndex),
}

/// Refuses a manifest, index or config of `size` bytes over [`MAX_JSON`]; `what` names it
/// (and the image it belongs to) for the error.
pub fn check_json_size(size: u64, what: impl FnOnce() -> String) -> Result<(), ImageError> {
    if size > MAX_JSON {
        return Err(ImageError::TooLarge {
            what: what(),
            size,
            limit: MAX_JSON,
            unit: "bytes",
            advice: JSON_ADVICE,
        });
    }
    Ok(())
}

fn check_size(what: &'static str, bytes: &[u8]) -> Result<(), ImageError> {
    check_json_size(bytes.len() as u64, || what.to_string())
}

/// Parses a manifest or index.
pub fn parse(bytes: &[u8]) -> Result<Parsed, ImageError> {
    check_size("manifest", bytes)?;
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| ImageError::Malformed {
            what: "manifest",
            message: e.to_string(),
        })?;
    let media = value
        .get("mediaType")
        .and_then(|m| m.as_str())
        .unwrap_or("");
    let is_index = media == OCI_INDEX
        || media == DOCKER_LIST
        || (media.is_empty() && value.get("manifests").is_some());
    let malformed = |e: serde_json::Error| ImageError::Malformed {
        what: if is_index { "image index" } else { "manifest" },
        message: e.to_string(),
    };
    if is_index {
        let index: OciImageIndex = serde_json::from_value(value).map_err(malformed)?;
        for m in &index.manifests {
            digest_hex(&m.digest)?;
        }
        Ok(Parsed::Index(index))
    } else {
        if !media.is_empty() && media != OCI_MANIFEST && media != DOCKER_MANIFEST {
            return Err(ImageError::UnsupportedMediaType(media.to_string()));
        }
        let manifest: OciImageManifest = serde_json::from_value(value).map_err(malformed)?;
        if manifest.schema_version != 2 {
            return Err(ImageError::Malformed {
                what: "manifest",
                message: format!("schemaVersion {} is not supported", manifest.schema_version),
            });
        }
        digest_hex(&manifest.config.digest)?;
        if manifest.config.size < 0 {
            return Err(ImageError::Malformed {
                what: "manifest",
                message: "the config has a negative size".into(),
            });
        }
        for l in &manifest.layers {
            digest_hex(&l.digest)?;
            layer_compression(&l.media_type)?;
            if l.size < 0 {
                return Err(ImageError::Malformed {
                    what: "manifest",
                    message: format!("layer {} has a negative size", l.digest),
                });
            }
        }
        Ok(Parsed::Manifest(Box::new(manifest)))
    }
}

/// The digest of the linux/amd64 manifest in an index.
pub fn pick_platform(index: &OciImageIndex) -> Option<String> {
    index
        .manifests
        .iter()
        .find(|m| {
            m.platform.as_ref().is_some_and(|p| {
                p.os.to_string() == "linux" && p.architecture.to_string() == "amd64"
            })
        })
        .map(|m| m.digest.clone())
}

/// What the store needs from an image config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigInfo {
    pub os: String,
    pub architecture: String,
    pub created: Option<chrono::DateTime<chrono::Utc>>,
    pub stop_signal: Option<String>,
    /// The `config` object as the image has it (Cmd, Env, …).
    pub config: serde_json::Value,
}

/// Parses an image config.
pub fn parse_config(bytes: &[u8]) -> Result<ConfigInfo, ImageError> {
    check_size("image config", bytes)?;
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| ImageError::Malformed {
            what: "image config",
            message: e.to_string(),
        })?;
    let text = |key: &str| v.get(key).and_then(|x| x.as_str()).map(str::to_string);
    let config = v.get("config").cloned().unwrap_or(serde_json::Value::Null);
    Ok(ConfigInfo {
        os: text("os").unwrap_or_else(|| "linux".into()),
        architecture: text("architecture").unwrap_or_else(|| "amd64".into()),
        created: text("created")
            .and_then(|c| chrono::DateTime::parse_from_rfc3339(&c).ok())
            .map(|c| c.into()),
        stop_signal: config
            .get("StopSignal")
            .and_then(|s| s.as_str())
            .map(str::to_string),
        config,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_and_oversized_json_are_errors() {
        assert!(matches!(parse(b"{"), Err(ImageError::Malformed { .. })));
        assert!(matches!(parse(b"[]"), Err(ImageError::Malformed { .. })));
        let huge = vec![b' '; (MAX_JSON + 1) as usize];
        assert!(matches!(parse(&huge), Err(ImageError::TooLarge { .. })));
        let bad_digest =
            br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
            "config":{"mediaType":"x","digest":"sha256:../../etc","size":1},"layers":[]}"#;
        assert!(matches!(
            parse(bad_digest),
            Err(ImageError::InvalidDigest(_))
        ));
        let v1 = br#"{"schemaVersion":1,"config":{"mediaType":"x","digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":1},"layers":[]}"#;
        assert!(parse(v1).is_err());
        assert!(parse_config(b"not json").is_err());
    }

    #[test]
    fn layer_media_types_map_to_compressions() {
        assert_eq!(
            layer_compression("application/vnd.oci.image.layer.v1.tar+zstd").unwrap(),
            Compression::Zstd
        );
        assert_eq!(
            layer_compression("application/vnd.docker.image.rootfs.diff.tar.gzip").unwrap(),
            Compression::Gzip
        );
        assert!(layer_compression("application/x-whatever").is_err());
    }
}
