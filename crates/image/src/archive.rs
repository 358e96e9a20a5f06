//! Image archives: `save` writes an OCI image-layout tar (what `skopeo copy oci-archive:`
//! reads); `load` reads that or a `docker save` archive. Archives are untrusted: they are
//! unpacked with the same hardened layer code as images, then every blob is verified against
//! its digest as it enters the content store.

use std::io::{Read, Write};
use std::path::Path;

use oci_client::manifest::{OciDescriptor, OciImageIndex, OciImageManifest};
use serde::Deserialize;

use crate::content::{digest_hex, digest_of};
use crate::error::ImageError;
use crate::manifest::{self, Parsed};
use crate::registry::parse_reference;
use crate::store::{ImageRecord, ImageStore};
use crate::unpack::layer::apply_layer;

const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// One entry of a `docker save` manifest.json.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>, ImageError> {
    let meta = std::fs::metadata(path).map_err(ImageError::io(path))?;
    if meta.len() > limit {
        return Err(ImageError::TooLarge {
            what: "archive metadata file",
            size: meta.len(),
            limit,
        });
    }
    std::fs::read(path).map_err(ImageError::io(path))
}

impl ImageStore {
    /// Writes the images `references` name as one OCI image-layout tar.
    pub fn save<W: Write>(&self, references: &[String], out: W) -> Result<(), ImageError> {
        let mut records: Vec<ImageRecord> = Vec::new();
        for r in references {
            records.push(self.inspect(r)?);
        }
        let mut tar = tar::Builder::new(out);
        let mut added = std::collections::HashSet::new();
        let mut add = |tar: &mut tar::Builder<W>, digest: &str| -> Result<(), ImageError> {
            if !added.insert(digest.to_string()) {
                return Ok(());
            }
            let path = self.content().path(digest)?;
            let name = format!("blobs/sha256/{}", digest_hex(digest)?);
            tar.append_path_with_name(&path, name)
                .map_err(ImageError::io(&path))
        };
        let mut index_entries = Vec::new();
        for r in &records {
            add(&mut tar, &r.digest)?;
            let m = self.content().read(&r.digest)?;
            let Parsed::Manifest(manifest) = manifest::parse(&m)? else {
                continue;
            };
            add(&mut tar, &manifest.config.digest)?;
            for l in &manifest.layers {
                add(&mut tar, &l.digest)?;
            }
            index_entries.push(serde_json::json!({
                "mediaType": manifest.media_type.clone().unwrap_or_else(|| manifest::OCI_MANIFEST.into()),
                "digest": r.digest,
                "size": m.len(),
                "platform": {"architecture": r.config.architecture, "os": r.config.os},
                "annotations": {REF_NAME: r.reference},
            }));
        }
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": manifest::OCI_INDEX,
            "manifests": index_entries,
        });
        let files: [(&str, Vec<u8>); 2] = [
            ("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec()),
            (
                "index.json",
                serde_json::to_vec(&index).expect("index serialises"),
            ),
        ];
        for (name, bytes) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(bytes.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            tar.append_data(&mut h, name, bytes.as_slice())
                .map_err(|e| ImageError::io(Path::new(name))(e))?;
        }
        tar.into_inner()
            .and_then(|mut w| w.flush())
            .map_err(|e| ImageError::io(Path::new("archive"))(e))
    }

    /// Loads every image of an OCI-layout or `docker save` archive; returns their records.
    pub fn load<R: Read>(&self, archive: R, work: &Path) -> Result<Vec<ImageRecord>, ImageError> {
        let dir = tempfile::Builder::new()
            .prefix(".load-")
            .tempdir_in(work)
            .map_err(ImageError::io(work))?;
        apply_layer(dir.path(), archive)?;
        if dir.path().join("index.json").exists() {
            self.load_oci(dir.path())
        } else if dir.path().join("manifest.json").exists() {
            self.load_docker(dir.path())
        } else {
            Err(ImageError::Malformed {
                what: "image archive",
                message: "neither an OCI image layout (index.json) nor a docker save archive (manifest.json)".into(),
            })
        }
    }

    /// Copies a blob from an unpacked layout into the store, verifying it.
    fn import_blob(
        &self,
        layout: &Path,
        what: &'static str,
        d: &OciDescriptor,
    ) -> Result<(), ImageError> {
        if self.content().contains(&d.digest) {
            return Ok(());
        }
        let path = layout.join("blobs/sha256").join(digest_hex(&d.digest)?);
        let mut file = std::fs::File::open(&path).map_err(|_| ImageError::Malformed {
            what: "image archive",
            message: format!("blob {} is missing", d.digest),
        })?;
        let mut w = self
            .content()
            .writer(what, &d.digest, Some(d.size.max(0) as u64))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf).map_err(ImageError::io(&path))?;
            if n == 0 {
                break;
            }
            w.write(&buf[..n])?;
        }
        w.commit()
    }

    fn load_oci(&self, layout: &Path) -> Result<Vec<ImageRecord>, ImageError> {
        let index: OciImageIndex = serde_json::from_slice(&read_limited(
            &layout.join("index.json"),
            manifest::MAX_JSON,
        )?)
        .map_err(|e| ImageError::Malformed {
            what: "image index",
            message: e.to_string(),
        })?;
        let mut loaded = Vec::new();
        for entry in &index.manifests {
            let name = entry
                .annotations
                .as_ref()
                .and_then(|a| a.get(REF_NAME))
                .cloned()
                .unwrap_or_else(|| {
                    let hex = digest_hex(&entry.digest).unwrap_or("unnamed");
                    hex.chars().take(12).collect()
                });
            // A bare tag (as skopeo writes) becomes a local reference.
            let name = if name.contains('/') {
                name
            } else {
                format!("localhost/loaded:{name}")
            };
            let reference = parse_reference(&name)?.whole();
            self.import_blob(layout, "manifest", &descriptor(&entry.digest, entry.size))?;
            let bytes = self.content().read(&entry.digest)?;
            let (manifest_digest, m) = match manifest::parse(&bytes)? {
                Parsed::Manifest(m) => (entry.digest.clone(), *m),
                Parsed::Index(inner) => {
                    let picked = manifest::pick_platform(&inner)
                        .ok_or_else(|| ImageError::NoPlatform(reference.clone()))?;
                    let size = inner
                        .manifests
                        .iter()
                        .find(|m| m.digest == picked)
                        .map(|m| m.size)
                        .unwrap_or_default();
                    self.import_blob(layout, "manifest", &descriptor(&picked, size))?;
                    match manifest::parse(&self.content().read(&picked)?)? {
                        Parsed::Manifest(m) => (picked, *m),
                        Parsed::Index(_) => {
                            return Err(ImageError::Malformed {
                                what: "image index",
                                message: "an index inside an index".into(),
                            });
                        }
                    }
                }
            };
            self.import_manifest_blobs(layout, &m)?;
            self.record_loaded(&reference, &manifest_digest)?;
            loaded.push(self.inspect(&reference)?);
        }
        Ok(loaded)
    }

    fn import_manifest_blobs(&self, layout: &Path, m: &OciImageManifest) -> Result<(), ImageError> {
        self.import_blob(layout, "config", &m.config)?;
        manifest::parse_config(&self.content().read(&m.config.digest)?)?;
        for l in &m.layers {
            self.import_blob(layout, "layer", l)?;
        }
        Ok(())
    }

    fn load_docker(&self, dir: &Path) -> Result<Vec<ImageRecord>, ImageError> {
        let entries: Vec<DockerEntry> = serde_json::from_slice(&read_limited(
            &dir.join("manifest.json"),
            manifest::MAX_JSON,
        )?)
        .map_err(|e| ImageError::Malformed {
            what: "docker save manifest.json",
            message: e.to_string(),
        })?;
        let mut loaded = Vec::new();
        for e in entries {
            let config_bytes = read_limited(&dir.join(&e.config), manifest::MAX_JSON)?;
            manifest::parse_config(&config_bytes)?;
            let config_digest = digest_of(&config_bytes);
            self.content()
                .put("config", &config_digest, &config_bytes)?;
            let mut layers = Vec::new();
            for l in &e.layers {
                let path = dir.join(l);
                let bytes = std::fs::read(&path).map_err(|_| ImageError::Malformed {
                    what: "docker save archive",
                    message: format!("layer {l} is missing"),
                })?;
                let gz = bytes.starts_with(&[0x1f, 0x8b]);
                let digest = digest_of(&bytes);
                self.content().put("layer", &digest, &bytes)?;
                layers.push(serde_json::json!({
                    "mediaType": if gz { "application/vnd.docker.image.rootfs.diff.tar.gzip" } else { "application/vnd.docker.image.rootfs.diff.tar" },
                    "digest": digest,
                    "size": bytes.len(),
                }));
            }
            let m = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": manifest::DOCKER_MANIFEST,
                "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": config_digest, "size": config_bytes.len()},
                "layers": layers,
            });
            let bytes = serde_json::to_vec(&m).expect("manifest serialises");
            let digest = digest_of(&bytes);
            self.content().put("manifest", &digest, &bytes)?;
            let tags = e.repo_tags.unwrap_or_default();
            let tags = if tags.is_empty() {
                vec![format!("localhost/loaded:{}", &digest_hex(&digest)?[..12])]
            } else {
                tags
            };
            for t in tags {
                let reference = parse_reference(&t)?.whole();
                self.record_loaded(&reference, &digest)?;
                loaded.push(self.inspect(&reference)?);
            }
        }
        Ok(loaded)
    }
}

fn descriptor(digest: &str, size: i64) -> OciDescriptor {
    OciDescriptor {
        media_type: manifest::OCI_MANIFEST.into(),
        digest: digest.to_string(),
        size,
        ..Default::default()
    }
}
