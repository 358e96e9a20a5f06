//! Committing a machine: a tar of its whole filesystem becomes a new image, one gzip layer,
//! with its base image's config (environment, entrypoint, command, labels, stop signal) and
//! labels naming where it came from. One layer rather than a diff over the base's: the tar
//! is the filesystem as it is, so deletions need no whiteouts and the image is right
//! whatever happened to the base's files; the cost is a layer as big as the filesystem.
//!
//! Like a pull or a load, the name is recorded only once the blobs are stored and verified
//! and the base disk is built; until then a lease holds the new blobs against collection.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use sha2::{Digest, Sha256};

use crate::content::{BlobWriter, digest_of};
use crate::error::ImageError;
use crate::manifest;
use crate::registry;
use crate::store::{ImageRecord, ImageStore, Namespace};

/// The media type of the committed layer.
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// The media type of the committed image's config.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";

/// What a commit is made of besides the filesystem.
#[derive(Debug, Clone)]
pub struct CommitSpec {
    /// The manifest digest of the image the machine was made from: its config is kept.
    pub base: String,
    /// The name to record, in the committing namespace.
    pub reference: String,
    /// Labels added to the config's (these win over the base's of the same key).
    pub labels: BTreeMap<String, String>,
    /// Names the commit in the image's history (`container machine commit dev`).
    pub created_by: String,
}

/// A writer into a blob that fails the way `io::Write` callers expect.
struct BlobSink(BlobWriter);

impl Write for BlobSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf).map_err(std::io::Error::other)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The committed image's config: the base's, with `labels` added, a fresh creation time, and
/// one layer of `diff_id` in its root filesystem and history.
pub fn commit_config(
    base: &[u8],
    labels: &BTreeMap<String, String>,
    diff_id: &str,
    created_by: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<serde_json::Value, ImageError> {
    manifest::parse_config(base)?;
    let mut config: serde_json::Value =
        serde_json::from_slice(base).map_err(|e| ImageError::Malformed {
            what: "image config",
            message: e.to_string(),
        })?;
    let created = now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let object = config
        .as_object_mut()
        .ok_or_else(|| ImageError::Malformed {
            what: "image config",
            message: "not a JSON object".into(),
        })?;
    let inner = object
        .entry("config")
        .or_insert_with(|| serde_json::json!({}));
    if !inner.is_object() {
        *inner = serde_json::json!({});
    }
    let inner = inner.as_object_mut().expect("made an object above");
    let existing = inner
        .entry("Labels")
        .or_insert_with(|| serde_json::json!({}));
    if !existing.is_object() {
        *existing = serde_json::json!({});
    }
    let existing = existing.as_object_mut().expect("made an object above");
    for (k, v) in labels {
        existing.insert(k.clone(), serde_json::Value::String(v.clone()));
    }
    object.insert("created".into(), created.clone().into());
    object.insert(
        "rootfs".into(),
        serde_json::json!({ "type": "layers", "diff_ids": [diff_id] }),
    );
    object.insert(
        "history".into(),
        serde_json::json!([{ "created": created, "created_by": created_by }]),
    );
    Ok(config)
}

impl ImageStore {
    /// Makes an image of the tar stream `tar` (a machine's whole filesystem) with the config
    /// of `spec.base`, and names it `spec.reference` in `namespace`, replacing what that name
    /// pointed at there (and nowhere else). Blocking.
    pub fn commit(
        &self,
        namespace: Namespace,
        spec: &CommitSpec,
        tar: impl Read,
    ) -> Result<ImageRecord, ImageError> {
        let reference = registry::parse_reference(&spec.reference)?.whole();
        let mut lease = self.lease();
        lease.add(&spec.base);
        let base = self.manifest_of(&spec.base)?;
        let base_config = self.content.read(&base.config.digest)?;
        manifest::parse_config(&base_config)?;

        // The layer: the tar, gzip-compressed into the content store, hashed on both sides
        // (the compressed digest names the blob, the uncompressed one is its diff_id).
        let mut uncompressed = Sha256::new();
        let sink = BlobSink(self.content.writer_unnamed("layer")?);
        let mut gz = flate2::write::GzEncoder::new(sink, flate2::Compression::fast());
        let mut tar = tar;
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = match tar.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(ImageError::Archive { source }),
            };
            uncompressed.update(&buf[..n]);
            gz.write_all(&buf[..n])
                .map_err(|e| ImageError::io(&self.work_dir())(e))?;
        }
        let BlobSink(writer) = gz
            .finish()
            .map_err(|e| ImageError::io(&self.work_dir())(e))?;
        let layer_size = writer.written();
        let layer = writer.commit()?;
        lease.add(&layer);
        let diff_id = format!("sha256:{}", hex::encode(uncompressed.finalize()));

        let config = commit_config(
            &base_config,
            &spec.labels,
            &diff_id,
            &spec.created_by,
            chrono::Utc::now(),
        )?;
        let config_bytes = serde_json::to_vec(&config).expect("a config serialises");
        let config_digest = digest_of(&config_bytes);
        self.content.put("config", &config_digest, &config_bytes)?;
        lease.add(&config_digest);

        let m = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": manifest::OCI_MANIFEST,
            "config": {
                "mediaType": CONFIG_MEDIA_TYPE,
                "digest": config_digest,
                "size": config_bytes.len(),
            },
            "layers": [{
                "mediaType": LAYER_MEDIA_TYPE,
                "digest": layer,
                "size": layer_size,
            }],
        });
        let bytes = serde_json::to_vec(&m).expect("a manifest serialises");
        manifest::parse(&bytes)?;
        let digest = digest_of(&bytes);
        self.content.put("manifest", &digest, &bytes)?;
        lease.add(&digest);
        self.disk_job(&digest, &reference)?.run()?;
        self.set_ref(namespace, &reference, &digest, None)?;
        drop(lease);
        self.inspect(namespace, &reference)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_keeps_the_base_s_and_adds_the_source() {
        let base = br#"{"architecture":"amd64","os":"linux",
            "config":{"Env":["PATH=/bin"],"Cmd":["/bin/sh"],"Entrypoint":["/init"],
                      "StopSignal":"SIGUSR2","Labels":{"a":"1","org.container.machine.source":"old"}},
            "rootfs":{"type":"layers","diff_ids":["sha256:1","sha256:2"]},
            "history":[{"created_by":"x"},{"created_by":"y"}]}"#;
        let labels = BTreeMap::from([
            (
                "org.container.machine.source".to_string(),
                "dev".to_string(),
            ),
            (
                "org.container.machine.base".to_string(),
                "sha256:b".to_string(),
            ),
        ]);
        let now = chrono::DateTime::parse_from_rfc3339("2026-12-03T10:00:00Z")
            .unwrap()
            .into();
        let c = commit_config(
            base,
            &labels,
            "sha256:d",
            "container machine commit dev",
            now,
        )
        .unwrap();
        assert_eq!(c["config"]["Env"], serde_json::json!(["PATH=/bin"]));
        assert_eq!(c["config"]["Cmd"], serde_json::json!(["/bin/sh"]));
        assert_eq!(c["config"]["Entrypoint"], serde_json::json!(["/init"]));
        assert_eq!(c["config"]["StopSignal"], "SIGUSR2");
        assert_eq!(c["config"]["Labels"]["a"], "1");
        assert_eq!(c["config"]["Labels"]["org.container.machine.source"], "dev");
        assert_eq!(
            c["config"]["Labels"]["org.container.machine.base"],
            "sha256:b"
        );
        assert_eq!(c["rootfs"]["diff_ids"], serde_json::json!(["sha256:d"]));
        assert_eq!(c["history"].as_array().unwrap().len(), 1);
        assert_eq!(c["created"], "2026-12-03T10:00:00Z");
        assert_eq!(c["os"], "linux");
    }

    #[test]
    fn a_base_without_a_config_object_still_gets_the_labels() {
        let c = commit_config(
            br#"{"os":"linux","architecture":"amd64"}"#,
            &BTreeMap::from([("k".to_string(), "v".to_string())]),
            "sha256:d",
            "x",
            chrono::Utc::now(),
        )
        .unwrap();
        assert_eq!(c["config"]["Labels"]["k"], "v");
        assert!(
            commit_config(b"[]", &BTreeMap::new(), "sha256:d", "x", chrono::Utc::now()).is_err()
        );
    }
}
