//! The image store: references (`refs.json`, name → manifest digest, replaced atomically),
//! blobs in the content store, and one ext4 base disk per manifest (`disks/<hex>/`).
//! A reference is recorded only after every blob it needs is present and verified, so a
//! failed or killed pull leaves no image behind; garbage collection removes what no reference
//! reaches.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use futures::{StreamExt, TryStreamExt};
use oci_client::manifest::OciImageManifest;
use serde::{Deserialize, Serialize};

use crate::content::{ContentStore, digest_hex, digest_of};
use crate::error::ImageError;
use crate::manifest::{self, ConfigInfo, Parsed};
use crate::registry::{self, Credentials};
use crate::unpack::{self, DiskInfo};

/// Progress of a pull, for the caller to render.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    Resolved {
        digest: String,
        layers: usize,
    },
    Bytes {
        digest: String,
        current: u64,
        total: u64,
    },
    BlobDone {
        digest: String,
        cached: bool,
    },
    Step(String),
}

/// Options of a pull.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Registries reached over plain HTTP besides loopback ones.
    pub insecure: Vec<String>,
    pub max_concurrent_downloads: usize,
    /// Whose registry credentials to use.
    pub uid: u32,
}

impl Default for PullOptions {
    fn default() -> Self {
        Self {
            insecure: Vec::new(),
            max_concurrent_downloads: 3,
            uid: 0,
        }
    }
}

/// One layer of an image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerRecord {
    pub digest: String,
    pub media_type: String,
    pub size: u64,
}

/// Everything the store knows about one image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The reference this record was looked up by (the first one when listing by digest).
    pub reference: String,
    pub references: Vec<String>,
    pub digest: String,
    pub media_type: String,
    /// Config plus layer blob sizes.
    pub size: u64,
    pub layers: Vec<LayerRecord>,
    pub config: ConfigInfo,
    /// The base disk, once built.
    pub disk: Option<(PathBuf, DiskInfo)>,
}

/// What `remove` did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Removed {
    pub untagged: Vec<String>,
    pub deleted: Vec<String>,
    pub freed_bytes: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Refs {
    references: BTreeMap<String, String>,
}

/// The image store rooted at a directory.
#[derive(Debug)]
pub struct ImageStore {
    root: PathBuf,
    content: ContentStore,
    /// Serialises reference updates, collection and disk builds.
    lock: Mutex<()>,
}

impl ImageStore {
    pub fn open(root: &Path) -> Result<Self, ImageError> {
        std::fs::create_dir_all(root.join("disks")).map_err(ImageError::io(root))?;
        std::fs::create_dir_all(root.join("work")).map_err(ImageError::io(root))?;
        // Builds interrupted by a crash leave only their temporary directories.
        if let Ok(entries) = std::fs::read_dir(root.join("work")) {
            for e in entries.flatten() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        Ok(Self {
            root: root.to_path_buf(),
            content: ContentStore::open(root)?,
            lock: Mutex::new(()),
        })
    }

    /// The registry credentials of a host user.
    pub fn credentials(&self, uid: u32) -> Credentials {
        Credentials::for_uid(&self.root, uid)
    }

    pub fn content(&self) -> &ContentStore {
        &self.content
    }

    fn refs_path(&self) -> PathBuf {
        self.root.join("refs.json")
    }

    fn load_refs(&self) -> Result<Refs, ImageError> {
        let p = self.refs_path();
        Ok(crate::fsutil::read_json(&p)
            .map_err(ImageError::io(&p))?
            .unwrap_or_default())
    }

    fn save_refs(&self, refs: &Refs) -> Result<(), ImageError> {
        let p = self.refs_path();
        crate::fsutil::write_json(&p, refs).map_err(ImageError::io(&p))
    }

    fn disk_dir(&self, digest: &str) -> Result<PathBuf, ImageError> {
        Ok(self.root.join("disks").join(digest_hex(digest)?))
    }

    fn guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a loaded image's reference.
    pub(crate) fn record_loaded(&self, reference: &str, digest: &str) -> Result<(), ImageError> {
        self.set_ref(reference, digest)
    }

    /// The scratch directory for builds and loads.
    pub fn work_dir(&self) -> PathBuf {
        self.root.join("work")
    }

    /// Records `reference` → `digest`.
    fn set_ref(&self, reference: &str, digest: &str) -> Result<(), ImageError> {
        let _g = self.guard();
        let mut refs = self.load_refs()?;
        refs.references
            .insert(reference.to_string(), digest.to_string());
        self.save_refs(&refs)
    }

    /// Pulls an image and records its reference.
    pub async fn pull(
        &self,
        reference: &str,
        opts: &PullOptions,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<ImageRecord, ImageError> {
        let r = registry::parse_reference(reference)?;
        let name = r.whole();
        let reg = r.resolve_registry().to_string();
        let client = registry::client(&reg, &opts.insecure);
        let auth = self.credentials(opts.uid).auth_for(r.registry())?;
        let (bytes, mut digest) = client
            .pull_manifest_raw(&r, &auth, manifest::ACCEPTED)
            .await
            .map_err(|e| registry::registry_error(&reg, &name, e))?;
        verify_json("manifest", &bytes, &digest)?;
        let mut bytes = bytes.to_vec();
        let mut parsed = manifest::parse(&bytes)?;
        let mut repo = r.clone();
        if let Parsed::Index(index) = &parsed {
            let picked = manifest::pick_platform(index)
                .ok_or_else(|| ImageError::NoPlatform(name.clone()))?;
            repo = oci_client::Reference::with_digest(
                r.registry().to_string(),
                r.repository().to_string(),
                picked.clone(),
            );
            let (b, d) = client
                .pull_manifest_raw(&repo, &auth, manifest::ACCEPTED)
                .await
                .map_err(|e| registry::registry_error(&reg, &name, e))?;
            if d != picked {
                return Err(ImageError::DigestMismatch {
                    what: "manifest",
                    digest: picked,
                    actual: d,
                });
            }
            verify_json("manifest", &b, &d)?;
            bytes = b.to_vec();
            digest = d;
            parsed = manifest::parse(&bytes)?;
        }
        let Parsed::Manifest(m) = parsed else {
            return Err(ImageError::Malformed {
                what: "manifest",
                message: "an index inside an index".into(),
            });
        };
        progress(Progress::Resolved {
            digest: digest.clone(),
            layers: m.layers.len(),
        });
        let mut blobs: Vec<(&'static str, String, u64, String)> = vec![(
            "config",
            m.config.digest.clone(),
            m.config.size as u64,
            m.config.media_type.clone(),
        )];
        for l in &m.layers {
            blobs.push((
                "layer",
                l.digest.clone(),
                l.size as u64,
                l.media_type.clone(),
            ));
        }
        let fetches: Vec<_> = blobs
            .into_iter()
            .map(|(what, blob, size, media)| {
                Box::pin(self.fetch_blob(&client, &repo, &name, what, blob, size, media, progress))
                    as std::pin::Pin<
                        Box<dyn std::future::Future<Output = Result<(), ImageError>> + Send + '_>,
                    >
            })
            .collect();
        futures::stream::iter(fetches)
            .buffer_unordered(opts.max_concurrent_downloads.max(1))
            .try_collect::<Vec<()>>()
            .await?;
        // The config must parse before the image is recorded.
        manifest::parse_config(&self.content.read(&m.config.digest)?)?;
        self.content.put("manifest", &digest, &bytes)?;
        self.set_ref(&name, &digest)?;
        progress(Progress::Step("building the base disk".into()));
        let record = self.inspect(&name)?;
        Ok(record)
    }

    /// Fetches one blob into the content store, verified; a present blob is not fetched.
    #[allow(clippy::too_many_arguments)]
    async fn fetch_blob(
        &self,
        client: &oci_client::Client,
        repo: &oci_client::Reference,
        name: &str,
        what: &'static str,
        blob: String,
        size: u64,
        media: String,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<(), ImageError> {
        let content = &self.content;
        let reg = repo.resolve_registry().to_string();
        if content.contains(&blob) {
            progress(Progress::BlobDone {
                digest: blob,
                cached: true,
            });
            return Ok(());
        }
        let descriptor = oci_client::manifest::OciDescriptor {
            media_type: media,
            digest: blob.clone(),
            size: size as i64,
            ..Default::default()
        };
        let stream = client
            .pull_blob_stream(repo, &descriptor)
            .await
            .map_err(|e| registry::registry_error(&reg, name, e))?;
        let mut writer = content.writer(what, &blob, Some(size))?;
        let mut stream = stream.stream;
        let mut last = 0;
        while let Some(chunk) = stream
            .try_next()
            .await
            .map_err(|e| registry::registry_error(&reg, name, e.into()))?
        {
            writer.write(&chunk)?;
            if writer.written() - last >= 256 << 10 || writer.written() == size {
                last = writer.written();
                progress(Progress::Bytes {
                    digest: blob.clone(),
                    current: last,
                    total: size,
                });
            }
        }
        writer.commit()?;
        progress(Progress::BlobDone {
            digest: blob,
            cached: false,
        });
        Ok(())
    }

    /// All references, each as a record.
    pub fn list(&self) -> Result<Vec<ImageRecord>, ImageError> {
        let refs = self.load_refs()?;
        refs.references.keys().map(|r| self.inspect(r)).collect()
    }

    /// Finds the manifest digest for a reference, a full digest, or a digest prefix.
    fn resolve(&self, refs: &Refs, wanted: &str) -> Result<(String, String), ImageError> {
        if let Some(d) = refs.references.get(wanted) {
            return Ok((wanted.to_string(), d.clone()));
        }
        if let Ok(r) = registry::parse_reference(wanted)
            && let Some(d) = refs.references.get(&r.whole())
        {
            return Ok((r.whole(), d.clone()));
        }
        let hex = wanted.trim_start_matches("sha256:");
        if hex.len() >= 6 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
            let matches: BTreeSet<&String> = refs
                .references
                .values()
                .filter(|d| d.trim_start_matches("sha256:").starts_with(hex))
                .collect();
            if matches.len() == 1 {
                let d = (*matches.iter().next().expect("one match")).clone();
                let r = refs
                    .references
                    .iter()
                    .find(|(_, v)| **v == d)
                    .map(|(k, _)| k.clone())
                    .unwrap_or_else(|| d.clone());
                return Ok((r, d));
            }
        }
        Err(ImageError::NotFound(wanted.to_string()))
    }

    fn manifest_of(&self, digest: &str) -> Result<OciImageManifest, ImageError> {
        match manifest::parse(&self.content.read(digest)?)? {
            Parsed::Manifest(m) => Ok(*m),
            Parsed::Index(_) => Err(ImageError::Malformed {
                what: "manifest",
                message: format!("{digest} is an index"),
            }),
        }
    }

    /// Everything about one image.
    pub fn inspect(&self, wanted: &str) -> Result<ImageRecord, ImageError> {
        let refs = self.load_refs()?;
        let (reference, digest) = self.resolve(&refs, wanted)?;
        let m = self.manifest_of(&digest)?;
        let config = manifest::parse_config(&self.content.read(&m.config.digest)?)?;
        let layers: Vec<LayerRecord> = m
            .layers
            .iter()
            .map(|l| LayerRecord {
                digest: l.digest.clone(),
                media_type: l.media_type.clone(),
                size: l.size as u64,
            })
            .collect();
        let size = m.config.size as u64 + layers.iter().map(|l| l.size).sum::<u64>();
        let dir = self.disk_dir(&digest)?;
        let disk = crate::fsutil::read_json::<DiskInfo>(&dir.join("info.json"))
            .ok()
            .flatten()
            .map(|info| (dir.join("base.ext4"), info));
        Ok(ImageRecord {
            references: refs
                .references
                .iter()
                .filter(|(_, d)| **d == digest)
                .map(|(r, _)| r.clone())
                .collect(),
            reference,
            media_type: m
                .media_type
                .clone()
                .unwrap_or_else(|| manifest::OCI_MANIFEST.into()),
            digest,
            size,
            layers,
            config,
            disk,
        })
    }

    /// Builds (once) and returns the base disk of an image.
    pub fn base_disk(&self, wanted: &str) -> Result<(PathBuf, DiskInfo), ImageError> {
        let record = self.inspect(wanted)?;
        if let Some(d) = record.disk {
            return Ok(d);
        }
        let _g = self.guard();
        let dir = self.disk_dir(&record.digest)?;
        if let Ok(Some(info)) = crate::fsutil::read_json::<DiskInfo>(&dir.join("info.json")) {
            return Ok((dir.join("base.ext4"), info));
        }
        let layers = record
            .layers
            .iter()
            .map(|l| {
                Ok((
                    self.content.path(&l.digest)?,
                    manifest::layer_compression(&l.media_type)?,
                ))
            })
            .collect::<Result<Vec<_>, ImageError>>()?;
        let info = unpack::build_base_disk(&layers, &self.root.join("work"), &dir)?;
        Ok((dir.join("base.ext4"), info))
    }

    /// Adds `target` as another reference to the image `source` names.
    pub fn tag(&self, source: &str, target: &str) -> Result<ImageRecord, ImageError> {
        let refs = self.load_refs()?;
        let (_, digest) = self.resolve(&refs, source)?;
        let target = registry::parse_reference(target)?.whole();
        self.set_ref(&target, &digest)?;
        self.inspect(&target)
    }

    /// Removes a reference, then collects what nothing references. `in_use` maps manifest
    /// digests to the machines created from them: their images are kept unless `force`, and
    /// their base disks are kept always (the machines' disks are overlays over them).
    pub fn remove(
        &self,
        wanted: &str,
        in_use: &BTreeMap<String, Vec<String>>,
        force: bool,
    ) -> Result<Removed, ImageError> {
        let _g = self.guard();
        let mut refs = self.load_refs()?;
        let (reference, digest) = self.resolve(&refs, wanted)?;
        let others = refs.references.values().filter(|d| **d == digest).count() > 1;
        if !others
            && !force
            && let Some(machines) = in_use.get(&digest)
        {
            return Err(ImageError::InUse {
                reference,
                machines: machines.join(", "),
            });
        }
        refs.references.remove(&reference);
        self.save_refs(&refs)?;
        let mut removed = self.collect(&refs, in_use)?;
        removed.untagged.push(reference);
        Ok(removed)
    }

    /// Deletes blobs and base disks no reference reaches (base disks in use are kept).
    fn collect(
        &self,
        refs: &Refs,
        in_use: &BTreeMap<String, Vec<String>>,
    ) -> Result<Removed, ImageError> {
        let mut live: HashSet<String> = HashSet::new();
        for digest in refs.references.values() {
            live.insert(digest.clone());
            if let Ok(m) = self.manifest_of(digest) {
                live.insert(m.config.digest.clone());
                live.extend(m.layers.iter().map(|l| l.digest.clone()));
            }
        }
        let mut removed = Removed::default();
        for blob in self.content.list()? {
            if !live.contains(&blob) {
                removed.freed_bytes += self.content.remove(&blob)?;
                removed.deleted.push(blob);
            }
        }
        let disks = self.root.join("disks");
        for e in std::fs::read_dir(&disks)
            .map_err(ImageError::io(&disks))?
            .flatten()
        {
            let digest = format!("sha256:{}", e.file_name().to_string_lossy());
            if !live.contains(&digest) && !in_use.contains_key(&digest) {
                removed.freed_bytes += unpack::allocated_bytes(&e.path().join("base.ext4"));
                std::fs::remove_dir_all(e.path()).map_err(ImageError::io(&e.path()))?;
            }
        }
        Ok(removed)
    }
}

/// Checks a manifest's bytes against its digest and the size limit.
fn verify_json(what: &'static str, bytes: &[u8], digest: &str) -> Result<(), ImageError> {
    if bytes.len() as u64 > manifest::MAX_JSON {
        return Err(ImageError::TooLarge {
            what,
            size: bytes.len() as u64,
            limit: manifest::MAX_JSON,
        });
    }
    let actual = digest_of(bytes);
    if actual != digest {
        return Err(ImageError::DigestMismatch {
            what,
            digest: digest.to_string(),
            actual,
        });
    }
    Ok(())
}
