//! The image store: references (`refs.json`, name → manifest digest, replaced atomically),
//! blobs in the content store, and one ext4 base disk per manifest (`disks/<hex>/`).
//!
//! Invariant: a reference is recorded only once every blob it reaches is present and verified
//! and its base disk is built, so a failed or killed pull or load leaves no image behind.
//! Blobs an operation in flight still needs are held by a [`Lease`], which garbage collection
//! (see [`crate::gc`]) treats as a root, so collection can run beside a pull.
//!
//! Layout under the root:
//! - `refs.json`: `{"references": {"docker.io/library/alpine:latest": "sha256:…"}}`
//! - `blobs/sha256/<hex>`, `ingest/`: the content store ([`crate::content`])
//! - `disks/<hex>/{base.ext4,info.json}`: base disks, keyed by manifest digest
//! - `work/` (0700): staging trees and spooled archives; emptied at open
//! - `auth/<uid>.json` (0600): each host user's registry credentials

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use oci_client::manifest::OciImageManifest;
use serde::{Deserialize, Serialize};

use crate::content::{ContentStore, digest_hex};
use crate::error::ImageError;
use crate::manifest::{self, ConfigInfo, Parsed};
use crate::registry::{self, Credentials};
use crate::unpack::{self, DiskInfo};

/// Progress of a pull, for the caller to render.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Progress {
    /// The manifest is known: its digest and how many layers it has.
    Resolved { digest: String, layers: usize },
    /// Bytes of one blob received so far.
    Bytes {
        digest: String,
        current: u64,
        total: u64,
    },
    /// A blob is in the store; `cached` when it was there already and was not fetched.
    BlobDone { digest: String, cached: bool },
    /// A phase after the downloads (building the base disk…).
    Step(String),
}

/// Receives pull progress. Any `Fn(Progress) + Send + Sync` closure is one.
pub trait PullProgress: Send + Sync {
    /// Called for each event; must not block (the pull waits for it).
    fn report(&self, event: Progress);
}

impl<F: Fn(Progress) + Send + Sync> PullProgress for F {
    fn report(&self, event: Progress) {
        self(event)
    }
}

/// Options of a pull.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Registries reached over plain HTTP besides loopback ones (`host:port` as in references).
    pub insecure: Vec<String>,
    /// Blobs downloaded at once (at least one).
    pub max_concurrent_downloads: usize,
    /// Whose stored registry credentials to use (see [`Credentials::for_uid`]).
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

/// Caps on what one image may cost the host, beyond those fixed by the formats
/// ([`crate::manifest::MAX_JSON`] for manifests and configs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes an image's layers may expand to when unpacked (decompressed tar streams, plus
    /// sparse holes). Each build is also held to half the space free where it runs.
    pub max_unpacked_bytes: u64,
}

/// The default [`Limits::max_unpacked_bytes`]: 64 GiB, the default machine disk size, since
/// an image that unpacks to more cannot fit a default machine.
pub const DEFAULT_MAX_UNPACKED_BYTES: u64 = 64 << 30;

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_unpacked_bytes: DEFAULT_MAX_UNPACKED_BYTES,
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
    /// The reference this record was looked up by (the first one when looked up by digest).
    pub reference: String,
    /// Every reference naming this manifest.
    pub references: Vec<String>,
    /// The manifest digest: the image's identity.
    pub digest: String,
    pub media_type: String,
    /// Config plus layer blob sizes (compressed, as stored).
    pub size: u64,
    pub layers: Vec<LayerRecord>,
    /// The digest of the image config blob.
    pub config_digest: String,
    /// Platform, creation time, stop signal and the config object.
    pub config: ConfigInfo,
    /// The base disk and what building it found, once built.
    pub disk: Option<(PathBuf, DiskInfo)>,
}

impl ImageRecord {
    /// Whether `/sbin/init` is an executable file in the image; `None` before the base disk
    /// is built (pulls and loads build it, so only images of an older store lack it).
    pub fn has_init(&self) -> Option<bool> {
        self.disk.as_ref().map(|(_, d)| d.has_init)
    }
}

/// What `remove` did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Removed {
    pub untagged: Vec<String>,
    /// Blob digests deleted.
    pub deleted: Vec<String>,
    /// Bytes of blobs and base disks deleted (allocated bytes for disks).
    pub freed_bytes: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Refs {
    pub(crate) references: BTreeMap<String, String>,
}

/// Blobs and disks an operation in flight needs: collection keeps them while it lives.
#[derive(Debug)]
pub(crate) struct Lease {
    leases: Arc<Mutex<HashMap<String, usize>>>,
    digests: Vec<String>,
}

impl Lease {
    /// Adds a digest to the lease.
    pub(crate) fn add(&mut self, digest: &str) {
        let mut map = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry(digest.to_string()).or_default() += 1;
        self.digests.push(digest.to_string());
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut map = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        for d in &self.digests {
            if let Some(n) = map.get_mut(d) {
                *n -= 1;
                if *n == 0 {
                    map.remove(d);
                }
            }
        }
    }
}

/// The image store rooted at a directory. One process owns a store at a time.
#[derive(Debug)]
pub struct ImageStore {
    pub(crate) root: PathBuf,
    pub(crate) content: ContentStore,
    /// Serialises reference updates and collection.
    lock: Mutex<()>,
    /// Serialises base-disk builds (shared with blocking tasks).
    build_lock: Arc<Mutex<()>>,
    leases: Arc<Mutex<HashMap<String, usize>>>,
    limits: Limits,
}

impl ImageStore {
    /// Opens (creating) the store at `root`, removing what interrupted operations left, with
    /// the default [`Limits`].
    pub fn open(root: &Path) -> Result<Self, ImageError> {
        Self::open_with(root, Limits::default())
    }

    /// [`ImageStore::open`] with other limits.
    pub fn open_with(root: &Path, limits: Limits) -> Result<Self, ImageError> {
        let disks = root.join("disks");
        std::fs::create_dir_all(&disks).map_err(ImageError::io(&disks))?;
        let work = root.join("work");
        std::fs::create_dir_all(&work).map_err(ImageError::io(&work))?;
        // Staging trees hold the images' setuid files and device nodes: no one else may reach
        // them while they exist.
        std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o700))
            .map_err(ImageError::io(&work))?;
        for e in std::fs::read_dir(&work)
            .map_err(ImageError::io(&work))?
            .flatten()
        {
            let p = e.path();
            let r = if e.file_type().is_ok_and(|t| t.is_dir()) {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            r.map_err(ImageError::io(&p))?;
        }
        Ok(Self {
            root: root.to_path_buf(),
            content: ContentStore::open(root)?,
            lock: Mutex::new(()),
            build_lock: Arc::new(Mutex::new(())),
            leases: Arc::new(Mutex::new(HashMap::new())),
            limits,
        })
    }

    /// The caps this store holds images to.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The registry credentials of a host user.
    pub fn credentials(&self, uid: u32) -> Credentials {
        Credentials::for_uid(&self.root, uid)
    }

    /// The blob store.
    pub fn content(&self) -> &ContentStore {
        &self.content
    }

    /// The scratch directory for builds and spooled archives (0700, emptied at open).
    pub fn work_dir(&self) -> PathBuf {
        self.root.join("work")
    }

    fn refs_path(&self) -> PathBuf {
        self.root.join("refs.json")
    }

    pub(crate) fn load_refs(&self) -> Result<Refs, ImageError> {
        let p = self.refs_path();
        Ok(crate::fsutil::read_json(&p)
            .map_err(ImageError::io(&p))?
            .unwrap_or_default())
    }

    pub(crate) fn save_refs(&self, refs: &Refs) -> Result<(), ImageError> {
        let p = self.refs_path();
        crate::fsutil::write_json(&p, refs).map_err(ImageError::io(&p))
    }

    pub(crate) fn disk_dir(&self, digest: &str) -> Result<PathBuf, ImageError> {
        Ok(self.root.join("disks").join(digest_hex(digest)?))
    }

    pub(crate) fn guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new, empty lease.
    pub(crate) fn lease(&self) -> Lease {
        Lease {
            leases: self.leases.clone(),
            digests: Vec::new(),
        }
    }

    /// Digests held by leases right now.
    pub(crate) fn leased(&self) -> BTreeSet<String> {
        let map = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        map.keys().cloned().collect()
    }

    /// Records `reference` → `digest`.
    pub(crate) fn set_ref(&self, reference: &str, digest: &str) -> Result<(), ImageError> {
        let _g = self.guard();
        let mut refs = self.load_refs()?;
        refs.references
            .insert(reference.to_string(), digest.to_string());
        self.save_refs(&refs)
    }

    /// All references, each as a record, sorted by reference.
    pub fn list(&self) -> Result<Vec<ImageRecord>, ImageError> {
        let refs = self.load_refs()?;
        refs.references.keys().map(|r| self.inspect(r)).collect()
    }

    /// Finds `(reference, manifest digest)` for a reference (normalised or as written), a
    /// full digest, or a digest prefix of at least 6 hex digits.
    pub(crate) fn resolve(
        &self,
        refs: &Refs,
        wanted: &str,
    ) -> Result<(String, String), ImageError> {
        if let Some(d) = refs.references.get(wanted) {
            return Ok((wanted.to_string(), d.clone()));
        }
        if let Ok(r) = registry::parse_reference(wanted)
            && let Some(d) = refs.references.get(&r.whole())
        {
            return Ok((r.whole(), d.clone()));
        }
        if let Some(digest) = self.resolve_digest(refs, wanted)? {
            let reference = refs
                .references
                .iter()
                .find(|(_, v)| **v == digest)
                .map(|(k, _)| k.clone())
                .unwrap_or_else(|| digest.clone());
            return Ok((reference, digest));
        }
        Err(ImageError::NotFound(wanted.to_string()))
    }

    /// The one manifest digest `wanted` is a prefix of (`sha256:` optional), if it looks
    /// like a digest at all.
    fn resolve_digest(&self, refs: &Refs, wanted: &str) -> Result<Option<String>, ImageError> {
        let hex = wanted.strip_prefix("sha256:").unwrap_or(wanted);
        if hex.len() < 6 || hex.len() > 64 || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Ok(None);
        }
        let hex = hex.to_ascii_lowercase();
        let matches: BTreeSet<&String> = refs
            .references
            .values()
            .filter(|d| d.trim_start_matches("sha256:").starts_with(&hex))
            .collect();
        match matches.len() {
            0 => Ok(None),
            1 => Ok(matches.into_iter().next().cloned()),
            n => Err(ImageError::InvalidReference {
                reference: wanted.to_string(),
                reason: format!("this digest prefix matches {n} images; give more of the digest"),
            }),
        }
    }

    /// Whether `wanted` names an image by digest (every reference to it) rather than by name.
    pub(crate) fn is_digest_lookup(&self, refs: &Refs, wanted: &str) -> bool {
        !refs.references.contains_key(wanted)
            && !registry::parse_reference(wanted)
                .is_ok_and(|r| refs.references.contains_key(&r.whole()))
            && self.resolve_digest(refs, wanted).is_ok_and(|d| d.is_some())
    }

    pub(crate) fn manifest_of(&self, digest: &str) -> Result<OciImageManifest, ImageError> {
        match manifest::parse(&self.content.read(digest)?)? {
            Parsed::Manifest(m) => Ok(*m),
            Parsed::Index(_) => Err(ImageError::Malformed {
                what: "manifest",
                message: format!("{digest} is an index"),
            }),
        }
    }

    /// Everything about one image, by reference, digest or digest prefix.
    pub fn inspect(&self, wanted: &str) -> Result<ImageRecord, ImageError> {
        let refs = self.load_refs()?;
        let (reference, digest) = self.resolve(&refs, wanted)?;
        self.record(&refs, reference, digest)
    }

    fn record(
        &self,
        refs: &Refs,
        reference: String,
        digest: String,
    ) -> Result<ImageRecord, ImageError> {
        let m = self.manifest_of(&digest)?;
        let config = manifest::parse_config(&self.content.read(&m.config.digest)?)?;
        let layers: Vec<LayerRecord> = m
            .layers
            .iter()
            .map(|l| LayerRecord {
                digest: l.digest.clone(),
                media_type: l.media_type.clone(),
                size: l.size.max(0) as u64,
            })
            .collect();
        let size = m.config.size.max(0) as u64 + layers.iter().map(|l| l.size).sum::<u64>();
        let disk = self.built_disk(&digest)?;
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
            config_digest: m.config.digest.clone(),
            config,
            disk,
        })
    }

    /// The base disk of a manifest, if built.
    fn built_disk(&self, digest: &str) -> Result<Option<(PathBuf, DiskInfo)>, ImageError> {
        let dir = self.disk_dir(digest)?;
        Ok(crate::fsutil::read_json::<DiskInfo>(&dir.join("info.json"))
            .ok()
            .flatten()
            .map(|info| (dir.join("base.ext4"), info)))
    }

    /// Builds (once) and returns the base disk of an image named by reference or digest.
    /// Blocking: call it from `spawn_blocking` in async code.
    pub fn base_disk(&self, wanted: &str) -> Result<(PathBuf, DiskInfo), ImageError> {
        let record = self.inspect(wanted)?;
        if let Some(d) = record.disk {
            return Ok(d);
        }
        let mut lease = self.lease();
        lease.add(&record.digest);
        self.disk_job(&record.digest, &record.reference)?.run()
    }

    /// Whether the image's `/sbin/init` is an executable file (building the disk if needed).
    pub fn has_init(&self, wanted: &str) -> Result<bool, ImageError> {
        Ok(self.base_disk(wanted)?.1.has_init)
    }

    /// Everything needed to build a manifest's base disk, owned, so a blocking task can run it.
    /// `image` names it in errors.
    pub(crate) fn disk_job(&self, digest: &str, image: &str) -> Result<DiskJob, ImageError> {
        let m = self.manifest_of(digest)?;
        let layers = m
            .layers
            .iter()
            .map(|l| {
                Ok(unpack::LayerBlob {
                    digest: l.digest.clone(),
                    path: self.content.path(&l.digest)?,
                    compression: manifest::layer_compression(&l.media_type)?,
                })
            })
            .collect::<Result<Vec<_>, ImageError>>()?;
        Ok(DiskJob {
            image: image.to_string(),
            layers,
            work: self.work_dir(),
            dest: self.disk_dir(digest)?,
            max_unpacked: self.limits.max_unpacked_bytes,
            lock: self.build_lock.clone(),
        })
    }

    /// Adds `target` as another reference to the image `source` names.
    pub fn tag(&self, source: &str, target: &str) -> Result<ImageRecord, ImageError> {
        let target = registry::parse_reference(target)?.whole();
        {
            let _g = self.guard();
            let mut refs = self.load_refs()?;
            let (_, digest) = self.resolve(&refs, source)?;
            refs.references.insert(target.clone(), digest);
            self.save_refs(&refs)?;
        }
        self.inspect(&target)
    }
}

/// A base-disk build, detached from the store so it can run on a blocking thread.
#[derive(Debug)]
pub(crate) struct DiskJob {
    image: String,
    layers: Vec<unpack::LayerBlob>,
    work: PathBuf,
    dest: PathBuf,
    max_unpacked: u64,
    lock: Arc<Mutex<()>>,
}

impl DiskJob {
    /// Builds the disk unless it exists; returns it.
    pub(crate) fn run(self) -> Result<(PathBuf, DiskInfo), ImageError> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let info_path = self.dest.join("info.json");
        if let Ok(Some(info)) = crate::fsutil::read_json::<DiskInfo>(&info_path) {
            return Ok((self.dest.join("base.ext4"), info));
        }
        let info = unpack::build_base_disk(
            &self.image,
            &self.layers,
            &self.work,
            &self.dest,
            self.max_unpacked,
        )?;
        Ok((self.dest.join("base.ext4"), info))
    }
}
