//! The image store: references (`refs.json`, name → manifest digest, replaced atomically),
//! blobs in the content store, and one ext4 base disk per manifest (`disks/<hex>/`).
//!
//! Invariant: a reference is recorded only once every blob it reaches is present and verified
//! and its base disk is built, so a failed or killed pull or load leaves no image behind.
//! Blobs an operation in flight still needs are held by a [`Lease`], which garbage collection
//! (see [`crate::gc`]) treats as a root, so collection can run beside a pull.
//!
//! **Names are per user, content is shared** (containerd's namespaces). References live in a
//! [`Namespace`]: one per host uid, which only that user reads and changes, and
//! [`Namespace::System`], which root publishes and every user reads but cannot change. A
//! user's lookups read their own names first, then the system's (their own name shadows a
//! system name of the same text, for them alone); writes and removals touch only the
//! namespace they act in. Blobs and base disks are shared by digest: they are verified
//! against it, so one user's copy is the same bytes as another's; collection keeps whatever
//! any namespace names. A digest is only found through a name the caller sees, so knowing the
//! digest of another user's private image gives no access to it.
//!
//! All namespaces live in the one `refs.json`, rather than a file per uid: collection needs
//! every namespace's names at one instant, and a single atomic rename gives that, and makes
//! the migration of a store from before namespaces one crash-safe step (the old file or the
//! new one, each of which opens). The old format, `{"references": {…}}`, is read as names of
//! both root's namespace and the system one (so every user keeps seeing the images they saw)
//! and rewritten in the new format when the store opens.
//!
//! Layout under the root:
//! - `refs.json` (0600): `{"namespaces": {"system": {"references": {…}}, "1000": {"references":
//!   {"docker.io/library/alpine:latest": "sha256:…"}}}}`
//! - `blobs/sha256/<hex>`, `ingest/`: the content store ([`crate::content`]), 0700, blobs 0600
//! - `disks/<hex>/{base.ext4,info.json}` (0700, files 0600): base disks, keyed by manifest
//!   digest
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
    /// Mirrors per registry (`docker.io`, as references name it), tried in order before it.
    pub mirrors: BTreeMap<String, Vec<registry::Mirror>>,
    /// Blobs downloaded at once (at least one).
    pub max_concurrent_downloads: usize,
    /// Whose stored registry credentials to use (see [`Credentials::for_uid`]).
    pub uid: u32,
}

impl Default for PullOptions {
    fn default() -> Self {
        Self {
            insecure: Vec::new(),
            mirrors: BTreeMap::new(),
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

/// Where a pulled image came from: the registry or the mirror that served its manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSource {
    /// The reference as it was fetched (`127.0.0.1:5000/library/alpine:latest`).
    pub reference: String,
    /// Whether that was a mirror of the image's registry.
    pub mirror: bool,
}

/// Everything the store knows about one image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The reference this record was looked up by (the first one when looked up by digest).
    pub reference: String,
    /// The namespace holding `reference`.
    pub namespace: Namespace,
    /// Every reference naming this manifest that the looking namespace sees.
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
    /// Where the name's image was pulled from; `None` for a loaded image (and names from
    /// before sources were recorded).
    pub source: Option<ImageSource>,
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

/// Whose image names an operation reads and writes (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Namespace {
    /// A host user's own names: only that user (and root, listing all) sees them.
    User(u32),
    /// Names root publishes for every user to read; only root changes them.
    System,
}

impl Namespace {
    /// The key of this namespace in `refs.json`: `system`, or the uid in decimal.
    fn key(self) -> String {
        match self {
            Namespace::User(uid) => uid.to_string(),
            Namespace::System => "system".to_string(),
        }
    }

    fn from_key(key: &str) -> Option<Self> {
        match key {
            "system" => Some(Namespace::System),
            uid => uid.parse().ok().map(Namespace::User),
        }
    }

    /// The namespaces a lookup from this one reads, first match wins: a user's own names,
    /// then the system's.
    fn view(self) -> Vec<Namespace> {
        match self {
            Namespace::User(_) => vec![self, Namespace::System],
            Namespace::System => vec![Namespace::System],
        }
    }
}

impl std::fmt::Display for Namespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Namespace::User(uid) => write!(f, "uid {uid}"),
            Namespace::System => f.write_str("system"),
        }
    }
}

/// The names of one namespace.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub(crate) struct Names {
    pub(crate) references: BTreeMap<String, String>,
    /// Where each pulled name's image came from (a name absent here was loaded).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) sources: BTreeMap<String, ImageSource>,
}

impl Names {
    /// Points `reference` at `digest`, pulled from `source` (`None`: loaded or unknown).
    pub(crate) fn set(&mut self, reference: &str, digest: &str, source: Option<ImageSource>) {
        self.references
            .insert(reference.to_string(), digest.to_string());
        match source {
            Some(s) => self.sources.insert(reference.to_string(), s),
            None => self.sources.remove(reference),
        };
    }

    /// Forgets `reference`.
    pub(crate) fn remove(&mut self, reference: &str) {
        self.references.remove(reference);
        self.sources.remove(reference);
    }
}

/// `refs.json`: every namespace's names.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Refs {
    #[serde(default)]
    namespaces: BTreeMap<String, Names>,
    /// The one global table of a store from before namespaces; migrated when read.
    #[serde(default, skip_serializing)]
    references: Option<BTreeMap<String, String>>,
}

/// A name as a namespace sees it: the manifest it points at, where it lives and where it
/// was pulled from.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Named {
    pub(crate) digest: String,
    pub(crate) namespace: Namespace,
    pub(crate) source: Option<ImageSource>,
}

impl Refs {
    /// Moves the names of a store from before namespaces into root's namespace and the
    /// system one; true when there were any to move.
    fn migrate(&mut self) -> bool {
        let Some(old) = self.references.take() else {
            return false;
        };
        for ns in [Namespace::User(0), Namespace::System] {
            let names = self.namespaces.entry(ns.key()).or_default();
            for (r, d) in &old {
                names
                    .references
                    .entry(r.clone())
                    .or_insert_with(|| d.clone());
            }
        }
        true
    }

    /// The names of one namespace.
    pub(crate) fn names(&self, ns: Namespace) -> BTreeMap<String, String> {
        self.namespaces
            .get(&ns.key())
            .map(|n| n.references.clone())
            .unwrap_or_default()
    }

    /// The names of one namespace, to change.
    pub(crate) fn names_mut(&mut self, ns: Namespace) -> &mut Names {
        self.namespaces.entry(ns.key()).or_default()
    }

    /// Every name `ns` sees (its own shadowing the system's).
    pub(crate) fn visible(&self, ns: Namespace) -> BTreeMap<String, Named> {
        let mut out = BTreeMap::new();
        for namespace in ns.view() {
            let Some(names) = self.namespaces.get(&namespace.key()) else {
                continue;
            };
            for (r, digest) in &names.references {
                out.entry(r.clone()).or_insert(Named {
                    digest: digest.clone(),
                    namespace,
                    source: names.sources.get(r).cloned(),
                });
            }
        }
        out
    }

    /// Every namespace with names, each with its names.
    pub(crate) fn all(&self) -> Vec<(Namespace, Names)> {
        self.namespaces
            .iter()
            .filter_map(|(k, n)| Some((Namespace::from_key(k)?, n.clone())))
            .collect()
    }

    /// Every manifest any namespace names (collection's roots), whatever its key.
    pub(crate) fn digests(&self) -> BTreeSet<String> {
        self.namespaces
            .values()
            .flat_map(|n| n.references.values().cloned())
            .collect()
    }
}

/// An image held against collection ([`ImageStore::hold_base_disk`]) while it lives.
#[derive(Debug)]
pub struct Hold {
    _lease: Lease,
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
        // The store is root's alone: base disks hold whole images, private ones included,
        // and VMs get theirs as open descriptors, never by path.
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
            .map_err(ImageError::io(root))?;
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
        let store = Self {
            root: root.to_path_buf(),
            content: ContentStore::open(root)?,
            lock: Mutex::new(()),
            build_lock: Arc::new(Mutex::new(())),
            leases: Arc::new(Mutex::new(HashMap::new())),
            limits,
        };
        store.migrate()?;
        store.make_disks_private()?;
        Ok(store)
    }

    /// Makes base disks built before they were private (0644 in 0755 directories) root's
    /// alone, as new ones are.
    fn make_disks_private(&self) -> Result<(), ImageError> {
        let disks = self.root.join("disks");
        let private = |path: &Path, mode: u32| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .map_err(ImageError::io(path))
        };
        private(&disks, 0o700)?;
        for e in std::fs::read_dir(&disks)
            .map_err(ImageError::io(&disks))?
            .flatten()
        {
            let dir = e.path();
            let base = dir.join("base.ext4");
            if e.file_type().is_ok_and(|t| t.is_dir()) && base.is_file() {
                private(&dir, 0o700)?;
                private(&base, 0o600)?;
            }
        }
        Ok(())
    }

    /// Rewrites a `refs.json` from before namespaces in the new format, in one atomic step.
    fn migrate(&self) -> Result<(), ImageError> {
        let p = self.refs_path();
        let mut refs: Refs = crate::fsutil::read_json(&p)
            .map_err(ImageError::io(&p))?
            .unwrap_or_default();
        if refs.migrate() {
            self.save_refs(&refs)?;
        }
        Ok(())
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
        let mut refs: Refs = crate::fsutil::read_json(&p)
            .map_err(ImageError::io(&p))?
            .unwrap_or_default();
        // Only if the file was replaced by an old one behind the store's back.
        refs.migrate();
        Ok(refs)
    }

    /// Writes `refs.json` atomically, readable by root alone: it holds every user's names.
    pub(crate) fn save_refs(&self, refs: &Refs) -> Result<(), ImageError> {
        let p = self.refs_path();
        crate::fsutil::write_json_mode(&p, refs, 0o600).map_err(ImageError::io(&p))
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

    /// Records `reference` → `digest` in `namespace`, pulled from `source` (`None`: loaded).
    pub(crate) fn set_ref(
        &self,
        namespace: Namespace,
        reference: &str,
        digest: &str,
        source: Option<ImageSource>,
    ) -> Result<(), ImageError> {
        let _g = self.guard();
        let mut refs = self.load_refs()?;
        refs.names_mut(namespace).set(reference, digest, source);
        self.save_refs(&refs)
    }

    /// Every reference `namespace` sees, each as a record, sorted by reference.
    pub fn list(&self, namespace: Namespace) -> Result<Vec<ImageRecord>, ImageError> {
        let refs = self.load_refs()?;
        let visible = refs.visible(namespace);
        visible
            .iter()
            .map(|(r, n)| self.record(&visible, r.clone(), n.clone()))
            .collect()
    }

    /// Every namespace's references, each as a record holding its namespace, sorted by
    /// namespace (users by uid, then the system's) and reference. For root's eyes only.
    pub fn list_all(&self) -> Result<Vec<ImageRecord>, ImageError> {
        let refs = self.load_refs()?;
        let mut out = Vec::new();
        let mut all = refs.all();
        all.sort_by_key(|(ns, _)| *ns);
        for (namespace, names) in all {
            let own: BTreeMap<String, Named> = names
                .references
                .into_iter()
                .map(|(r, digest)| {
                    let source = names.sources.get(&r).cloned();
                    (
                        r,
                        Named {
                            digest,
                            namespace,
                            source,
                        },
                    )
                })
                .collect();
            for (r, n) in &own {
                out.push(self.record(&own, r.clone(), n.clone())?);
            }
        }
        Ok(out)
    }

    /// Finds the reference and what it names for a reference (normalised or as written), a
    /// full digest, or a digest prefix of at least 6 hex digits, among the `visible` names.
    pub(crate) fn resolve(
        &self,
        visible: &BTreeMap<String, Named>,
        wanted: &str,
    ) -> Result<(String, Named), ImageError> {
        if let Some(n) = visible.get(wanted) {
            return Ok((wanted.to_string(), n.clone()));
        }
        if let Ok(r) = registry::parse_reference(wanted)
            && let Some(n) = visible.get(&r.whole())
        {
            return Ok((r.whole(), n.clone()));
        }
        if let Some(digest) = self.resolve_digest(visible, wanted)? {
            // A digest is found only through a name, so there is one.
            if let Some((r, n)) = visible.iter().find(|(_, n)| n.digest == digest) {
                return Ok((r.clone(), n.clone()));
            }
        }
        Err(ImageError::NotFound(wanted.to_string()))
    }

    /// The one manifest digest `wanted` is a prefix of (`sha256:` optional), if it looks
    /// like a digest at all.
    fn resolve_digest(
        &self,
        visible: &BTreeMap<String, Named>,
        wanted: &str,
    ) -> Result<Option<String>, ImageError> {
        let hex = wanted.strip_prefix("sha256:").unwrap_or(wanted);
        if hex.len() < 6 || hex.len() > 64 || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Ok(None);
        }
        let hex = hex.to_ascii_lowercase();
        let matches: BTreeSet<&String> = visible
            .values()
            .map(|n| &n.digest)
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
    pub(crate) fn is_digest_lookup(&self, visible: &BTreeMap<String, Named>, wanted: &str) -> bool {
        !visible.contains_key(wanted)
            && !registry::parse_reference(wanted).is_ok_and(|r| visible.contains_key(&r.whole()))
            && self
                .resolve_digest(visible, wanted)
                .is_ok_and(|d| d.is_some())
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

    /// Everything about one image, by reference, digest or digest prefix, as `namespace`
    /// sees it.
    pub fn inspect(&self, namespace: Namespace, wanted: &str) -> Result<ImageRecord, ImageError> {
        let refs = self.load_refs()?;
        let visible = refs.visible(namespace);
        let (reference, named) = self.resolve(&visible, wanted)?;
        self.record(&visible, reference, named)
    }

    /// The record of `reference`, naming `named`, with the other names among `visible`.
    fn record(
        &self,
        visible: &BTreeMap<String, Named>,
        reference: String,
        named: Named,
    ) -> Result<ImageRecord, ImageError> {
        let Named {
            digest,
            namespace,
            source,
        } = named;
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
            references: visible
                .iter()
                .filter(|(_, n)| n.digest == digest)
                .map(|(r, _)| r.clone())
                .collect(),
            reference,
            namespace,
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
            source,
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

    /// Builds (once) and returns the base disk of an image `namespace` names by reference or
    /// digest. Blocking: call it from `spawn_blocking` in async code.
    pub fn base_disk(
        &self,
        namespace: Namespace,
        wanted: &str,
    ) -> Result<(PathBuf, DiskInfo), ImageError> {
        let record = self.inspect(namespace, wanted)?;
        if let Some(d) = record.disk {
            return Ok(d);
        }
        let mut lease = self.lease();
        lease.add(&record.digest);
        self.disk_job(&record.digest, &record.reference)?.run()
    }

    /// Resolves `wanted` as `namespace` sees it, holds the image (its blobs and base disk)
    /// against collection, and builds its base disk unless built: what a machine is created
    /// from. The name is resolved and the hold taken under the store's lock, so an image
    /// removed at the same moment is either not found here or kept until the [`Hold`] is
    /// dropped, by when the machine that needs it is recorded (and so in use). Blocking.
    pub fn hold_base_disk(
        &self,
        namespace: Namespace,
        wanted: &str,
    ) -> Result<(ImageRecord, (PathBuf, DiskInfo), Hold), ImageError> {
        let (record, hold) = {
            let _g = self.guard();
            let refs = self.load_refs()?;
            let visible = refs.visible(namespace);
            let (reference, named) = self.resolve(&visible, wanted)?;
            let mut lease = self.lease();
            lease.add(&named.digest);
            (
                self.record(&visible, reference, named)?,
                Hold { _lease: lease },
            )
        };
        let disk = match &record.disk {
            Some(d) => d.clone(),
            None => self.disk_job(&record.digest, &record.reference)?.run()?,
        };
        Ok((record, disk, hold))
    }

    /// Whether the image's `/sbin/init` is an executable file (building the disk if needed).
    pub fn has_init(&self, namespace: Namespace, wanted: &str) -> Result<bool, ImageError> {
        Ok(self.base_disk(namespace, wanted)?.1.has_init)
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

    /// Adds `target` to `namespace` as another reference to the image `source` names there
    /// (a user's own name, or a system one). Only `namespace` changes: a user's name of the
    /// same text as a system one shadows it for that user alone.
    pub fn tag(
        &self,
        namespace: Namespace,
        source: &str,
        target: &str,
    ) -> Result<ImageRecord, ImageError> {
        let target = registry::parse_reference(target)?.whole();
        {
            let _g = self.guard();
            let mut refs = self.load_refs()?;
            let (_, named) = self.resolve(&refs.visible(namespace), source)?;
            // The new name's image came from where the old one's did.
            refs.names_mut(namespace)
                .set(&target, &named.digest, named.source);
            self.save_refs(&refs)?;
        }
        self.inspect(namespace, &target)
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
