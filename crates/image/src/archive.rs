//! Image archives: `save` writes an OCI image-layout tar (what `skopeo copy oci-archive:`
//! reads), one manifest per image, named by `org.opencontainers.image.ref.name` (and
//! `io.containerd.image.name`, which docker reads); `load` reads that, any OCI image-layout tar
//! (skopeo's, docker's own), or a legacy `docker save` archive (`manifest.json`, layers as
//! `<id>/layer.tar`).
//!
//! Archives are untrusted. `load` never writes an archive's files to the filesystem by their
//! names: it streams the tar once, sending `blobs/sha256/<hex>` members into the content store
//! (verified against the digest their name claims) and other large members into it under the
//! digest of their bytes, and keeping small metadata members in memory, bounded. Names in the
//! metadata are then only looked up in that table, so no name can reach a host file. Like a
//! pull, a load records references only after every blob is present and the base disks are
//! built: a bad archive leaves no image.

use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::path::{Component, Path};

use oci_client::manifest::{OciImageIndex, OciImageManifest};
use serde::Deserialize;

use crate::content::{digest_hex, digest_of};
use crate::error::ImageError;
use crate::manifest::{self, Parsed};
use crate::registry::parse_reference;
use crate::store::{ImageRecord, ImageStore, Lease, Namespace};

/// The OCI annotation naming an image in a layout.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// containerd's (and docker's) annotation with the full image name.
pub const CONTAINERD_NAME: &str = "io.containerd.image.name";
/// The repository given to images whose archive names them only by tag, or not at all.
pub const LOADED_REPOSITORY: &str = "localhost/loaded";
/// Bytes of metadata members (everything but blobs and large files) kept in memory.
const MAX_METADATA: u64 = 64 << 20;
/// Members an archive may have.
const MAX_MEMBERS: usize = 100_000;
/// Symlinks followed when looking a member up.
const MAX_LINK_HOPS: usize = 16;

/// One entry of a `docker save` manifest.json.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// What an archive member became.
#[derive(Debug)]
enum Member {
    /// A small file, in memory.
    Small(Vec<u8>),
    /// A file now in the content store under this digest.
    Blob(String),
    /// A link to another member (normalised archive path).
    Link(String),
}

/// An archive read into the content store and memory.
#[derive(Debug)]
struct Members {
    files: HashMap<String, Member>,
    /// Digests whose bytes the archive itself carried (verified), as opposed to blobs the
    /// store merely has: an image is loaded only from these.
    held: BTreeSet<String>,
    lease: Lease,
}

/// An archive path made relative to the archive root, `..` resolved lexically (members are
/// only names in a table, never paths on the host).
fn normalise(path: &Path) -> String {
    let mut parts: Vec<String> = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            Component::ParentDir => {
                parts.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    parts.join("/")
}

fn malformed(message: String) -> ImageError {
    ImageError::Malformed {
        what: "image archive",
        message,
    }
}

impl Members {
    /// Streams `archive` into the store and memory.
    fn read<R: Read>(store: &ImageStore, archive: R) -> Result<Self, ImageError> {
        let mut files = HashMap::new();
        let mut held = BTreeSet::new();
        let mut lease = store.lease();
        let mut metadata = 0u64;
        let mut archive = tar::Archive::new(archive);
        let entries = archive
            .entries()
            .map_err(|source| ImageError::Archive { source })?;
        for entry in entries {
            let mut entry = entry.map_err(|source| ImageError::Archive { source })?;
            if files.len() >= MAX_MEMBERS {
                return Err(ImageError::TooLarge {
                    what: "image archive".into(),
                    size: files.len() as u64 + 1,
                    limit: MAX_MEMBERS as u64,
                    unit: "members",
                    advice: "image archives have a few members per layer; this one is broken \
                             or hostile",
                });
            }
            let path = normalise(
                &entry
                    .path()
                    .map_err(|source| ImageError::Archive { source })?,
            );
            let kind = entry.header().entry_type();
            let link = || -> Result<String, ImageError> {
                let target = entry
                    .link_name()
                    .map_err(|source| ImageError::Archive { source })?
                    .ok_or_else(|| malformed(format!("link {path} has no target")))?;
                Ok(if kind.is_symlink() && !target.is_absolute() {
                    let dir = Path::new(&path).parent().unwrap_or(Path::new(""));
                    normalise(&dir.join(target))
                } else {
                    normalise(&target)
                })
            };
            let member = if kind.is_symlink() || kind.is_hard_link() {
                Member::Link(link()?)
            } else if kind.is_file() || kind.is_contiguous() || kind.is_gnu_sparse() {
                let size = entry.size();
                let named = path
                    .strip_prefix("blobs/sha256/")
                    .map(|hex| format!("sha256:{hex}"))
                    .filter(|d| digest_hex(d).is_ok());
                if let Some(digest) = named {
                    // A blob the store has (perhaps another user's private image) is still
                    // read and checked: the archive must carry it to name it.
                    if store.content.contains(&digest) {
                        store
                            .content
                            .verify("archive blob", &digest, Some(size), &mut entry)?;
                    } else {
                        let mut w = store.content.writer("archive blob", &digest, Some(size))?;
                        w.write_from(&mut entry)?;
                        w.commit()?;
                    }
                    lease.add(&digest);
                    held.insert(digest.clone());
                    Member::Blob(digest)
                } else if size <= manifest::MAX_JSON && metadata + size <= MAX_METADATA {
                    metadata += size;
                    let mut bytes = Vec::with_capacity(size as usize);
                    entry
                        .read_to_end(&mut bytes)
                        .map_err(|source| ImageError::Archive { source })?;
                    Member::Small(bytes)
                } else {
                    let mut w = store.content.writer_unnamed("archive layer")?;
                    w.write_from(&mut entry)?;
                    let digest = w.commit()?;
                    lease.add(&digest);
                    held.insert(digest.clone());
                    Member::Blob(digest)
                }
            } else {
                continue;
            };
            files.insert(path, member);
        }
        Ok(Self { files, held, lease })
    }

    /// The member at `path`, links followed.
    fn get(&self, path: &str) -> Result<&Member, ImageError> {
        let mut path = normalise(Path::new(path));
        for _ in 0..MAX_LINK_HOPS {
            match self.files.get(&path) {
                Some(Member::Link(target)) => path = target.clone(),
                Some(m) => return Ok(m),
                None => return Err(malformed(format!("{path} is missing"))),
            }
        }
        Err(malformed(format!("{path}: too many levels of links")))
    }

    /// The bytes of a small member (metadata JSON).
    fn small(&self, store: &ImageStore, path: &str) -> Result<Vec<u8>, ImageError> {
        match self.get(path)? {
            Member::Small(bytes) => Ok(bytes.clone()),
            Member::Blob(digest) => read_small(store, digest),
            Member::Link(_) => Err(malformed(format!("{path}: unresolved link"))),
        }
    }

    /// The digest of a member, putting it in the content store (leased) if it is not yet.
    fn blob(
        &mut self,
        store: &ImageStore,
        what: &'static str,
        path: &str,
    ) -> Result<String, ImageError> {
        let digest = match self.get(path)? {
            Member::Blob(digest) => digest.clone(),
            Member::Small(bytes) => {
                let digest = digest_of(bytes);
                store.content.put(what, &digest, bytes)?;
                digest
            }
            Member::Link(_) => return Err(malformed(format!("{path}: unresolved link"))),
        };
        self.lease.add(&digest);
        self.held.insert(digest.clone());
        Ok(digest)
    }

    /// A blob the archive's metadata names, which the archive must have carried.
    fn require(&mut self, digest: &str) -> Result<(), ImageError> {
        digest_hex(digest)?;
        if !self.held.contains(digest) {
            return Err(malformed(format!(
                "blob {digest} is missing from the archive"
            )));
        }
        self.lease.add(digest);
        Ok(())
    }
}

/// A metadata blob from the store, refusing large ones before reading them.
fn read_small(store: &ImageStore, digest: &str) -> Result<Vec<u8>, ImageError> {
    let size = store.content.size(digest)?;
    manifest::check_json_size(size, || format!("metadata blob {digest} of the archive"))?;
    store.content.read(digest)
}

/// The reference an OCI layout entry's annotations give, normalised.
fn layout_name(
    annotations: Option<&std::collections::BTreeMap<String, String>>,
    digest: &str,
) -> Result<String, ImageError> {
    let named = annotations.and_then(|a| a.get(CONTAINERD_NAME).or_else(|| a.get(REF_NAME)));
    let name = match named {
        // A bare tag (what skopeo and docker write in ref.name) names no repository.
        Some(n) if !n.contains('/') && !n.contains(':') && !n.contains('@') => {
            format!("{LOADED_REPOSITORY}:{n}")
        }
        Some(n) => n.clone(),
        None => format!("{LOADED_REPOSITORY}:{}", &digest_hex(digest)?[..12]),
    };
    Ok(parse_reference(&name)?.whole())
}

impl ImageStore {
    /// Writes the images `references` name (references, digests or digest prefixes) as one
    /// OCI image-layout tar. Names resolve as `namespace` sees them: another user's private
    /// image is not found.
    pub fn save<W: Write>(
        &self,
        namespace: Namespace,
        references: &[String],
        out: W,
    ) -> Result<(), ImageError> {
        let records = references
            .iter()
            .map(|r| self.inspect(namespace, r))
            .collect::<Result<Vec<ImageRecord>, _>>()?;
        let mut tar = tar::Builder::new(out);
        let mut added = BTreeSet::new();
        let mut index_entries = Vec::new();
        for r in &records {
            let bytes = read_small(self, &r.digest)?;
            let m = self.manifest_of(&r.digest)?;
            let blobs = std::iter::once(&r.digest)
                .chain(std::iter::once(&m.config.digest))
                .chain(m.layers.iter().map(|l| &l.digest));
            for digest in blobs {
                if added.insert(digest.clone()) {
                    self.append_blob(&mut tar, digest)?;
                }
            }
            index_entries.push(serde_json::json!({
                "mediaType": m.media_type.clone().unwrap_or_else(|| manifest::OCI_MANIFEST.into()),
                "digest": r.digest,
                "size": bytes.len(),
                "platform": {"architecture": r.config.architecture, "os": r.config.os},
                "annotations": {REF_NAME: r.reference, CONTAINERD_NAME: r.reference},
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
                serde_json::to_vec(&index).expect("an index serialises"),
            ),
        ];
        for (name, bytes) in files {
            let mut h = member_header(bytes.len() as u64);
            tar.append_data(&mut h, name, bytes.as_slice())
                .map_err(ImageError::io(Path::new(name)))?;
        }
        tar.into_inner()
            .and_then(|mut w| w.flush())
            .map_err(ImageError::io(Path::new("the archive")))
    }

    fn append_blob<W: Write>(
        &self,
        tar: &mut tar::Builder<W>,
        digest: &str,
    ) -> Result<(), ImageError> {
        let path = self.content.path(digest)?;
        let file = std::fs::File::open(&path).map_err(ImageError::io(&path))?;
        let len = file.metadata().map_err(ImageError::io(&path))?.len();
        let mut h = member_header(len);
        tar.append_data(
            &mut h,
            format!("blobs/sha256/{}", digest_hex(digest)?),
            file,
        )
        .map_err(ImageError::io(&path))
    }

    /// Loads every image of an OCI-layout or `docker save` archive under the names it gives,
    /// in `namespace` only; returns their records. `_work` is unused (the archive is
    /// streamed) and kept for callers of the first version.
    pub fn load<R: Read>(
        &self,
        namespace: Namespace,
        archive: R,
        _work: &Path,
    ) -> Result<Vec<ImageRecord>, ImageError> {
        let mut members = Members::read(self, archive)?;
        let images = if members.files.contains_key("index.json") {
            self.layout_images(&mut members)?
        } else if members.files.contains_key("manifest.json") {
            self.docker_images(&mut members)?
        } else {
            return Err(malformed(
                "neither an OCI image layout (index.json) nor a docker save archive \
                 (manifest.json)"
                    .into(),
            ));
        };
        let mut built = BTreeSet::new();
        for (reference, digest) in &images {
            if built.insert(digest) {
                self.disk_job(digest, reference)?.run()?;
            }
        }
        for (reference, digest) in &images {
            self.set_ref(namespace, reference, digest, None)?;
        }
        drop(members);
        images
            .iter()
            .map(|(r, _)| self.inspect(namespace, r))
            .collect()
    }

    /// Checks a manifest's blobs are all present and its config parses.
    fn check_manifest(
        &self,
        members: &mut Members,
        m: &OciImageManifest,
    ) -> Result<(), ImageError> {
        members.require(&m.config.digest)?;
        manifest::parse_config(&read_small(self, &m.config.digest)?)?;
        for l in &m.layers {
            members.require(&l.digest)?;
        }
        Ok(())
    }

    /// The (reference, manifest digest) pairs of an OCI image layout.
    fn layout_images(&self, members: &mut Members) -> Result<Vec<(String, String)>, ImageError> {
        let index: OciImageIndex = serde_json::from_slice(&members.small(self, "index.json")?)
            .map_err(|e| ImageError::Malformed {
                what: "image index",
                message: e.to_string(),
            })?;
        let mut images = Vec::new();
        for entry in &index.manifests {
            let reference = layout_name(entry.annotations.as_ref(), &entry.digest)?;
            members.require(&entry.digest)?;
            let (digest, m) = match manifest::parse(&read_small(self, &entry.digest)?)? {
                Parsed::Manifest(m) => (entry.digest.clone(), *m),
                Parsed::Index(inner) => {
                    let picked = manifest::pick_platform(&inner)
                        .ok_or_else(|| ImageError::NoPlatform(reference.clone()))?;
                    members.require(&picked)?;
                    match manifest::parse(&read_small(self, &picked)?)? {
                        Parsed::Manifest(m) => (picked, *m),
                        Parsed::Index(_) => {
                            return Err(ImageError::Malformed {
                                what: "image index",
                                message: format!("{picked} is an index inside an index"),
                            });
                        }
                    }
                }
            };
            self.check_manifest(members, &m)?;
            images.push((reference, digest));
        }
        Ok(images)
    }

    /// The (reference, manifest digest) pairs of a `docker save` archive, whose manifests
    /// are made here (docker v2 schema) from its configs and layers.
    fn docker_images(&self, members: &mut Members) -> Result<Vec<(String, String)>, ImageError> {
        let entries: Vec<DockerEntry> =
            serde_json::from_slice(&members.small(self, "manifest.json")?).map_err(|e| {
                ImageError::Malformed {
                    what: "docker save manifest.json",
                    message: e.to_string(),
                }
            })?;
        let mut images = Vec::new();
        for e in entries {
            let config = members.blob(self, "config", &e.config)?;
            let config_bytes = read_small(self, &config)?;
            manifest::parse_config(&config_bytes)?;
            let mut layers = Vec::new();
            for l in &e.layers {
                let digest = members.blob(self, "layer", l)?;
                layers.push(serde_json::json!({
                    "mediaType": self.sniff_layer_type(&digest)?,
                    "digest": digest,
                    "size": self.content.size(&digest)?,
                }));
            }
            let m = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": manifest::DOCKER_MANIFEST,
                "config": {
                    "mediaType": "application/vnd.docker.container.image.v1+json",
                    "digest": config,
                    "size": config_bytes.len(),
                },
                "layers": layers,
            });
            let bytes = serde_json::to_vec(&m).expect("a manifest serialises");
            let digest = digest_of(&bytes);
            self.content.put("manifest", &digest, &bytes)?;
            members.lease.add(&digest);
            let tags = e.repo_tags.unwrap_or_default();
            if tags.is_empty() {
                let name = format!("{LOADED_REPOSITORY}:{}", &digest_hex(&digest)?[..12]);
                images.push((parse_reference(&name)?.whole(), digest.clone()));
            }
            for t in tags {
                images.push((parse_reference(&t)?.whole(), digest.clone()));
            }
        }
        Ok(images)
    }

    /// The media type of a docker layer, from its first bytes.
    fn sniff_layer_type(&self, digest: &str) -> Result<&'static str, ImageError> {
        let path = self.content.path(digest)?;
        let mut magic = [0u8; 4];
        let mut file = std::fs::File::open(&path).map_err(ImageError::io(&path))?;
        let n = file.read(&mut magic).map_err(ImageError::io(&path))?;
        Ok(match &magic[..n] {
            [0x1f, 0x8b, ..] => "application/vnd.docker.image.rootfs.diff.tar.gzip",
            [0x28, 0xb5, 0x2f, 0xfd] => "application/vnd.docker.image.rootfs.diff.tar.zstd",
            _ => "application/vnd.docker.image.rootfs.diff.tar",
        })
    }
}

/// A tar header for a regular, root-owned, world-readable member with a fixed mtime, so saved
/// archives of the same images are byte-identical.
fn member_header(size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(size);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_cksum();
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_names_never_leave_the_archive() {
        assert_eq!(normalise(Path::new("../../etc/shadow")), "etc/shadow");
        assert_eq!(normalise(Path::new("/abs/./x/../y")), "abs/y");
        assert_eq!(normalise(Path::new("./index.json")), "index.json");
    }

    #[test]
    fn layout_names_are_normalised() {
        let d = digest_of(b"x");
        let named = |k: &str, v: &str| {
            let mut m = std::collections::BTreeMap::new();
            m.insert(k.to_string(), v.to_string());
            layout_name(Some(&m), &d).unwrap()
        };
        assert_eq!(named(REF_NAME, "latest"), "localhost/loaded:latest");
        assert_eq!(named(REF_NAME, "alpine:3"), "docker.io/library/alpine:3");
        assert_eq!(
            named(CONTAINERD_NAME, "127.0.0.1:5000/a/b:c"),
            "127.0.0.1:5000/a/b:c"
        );
        assert!(
            layout_name(None, &d)
                .unwrap()
                .starts_with("localhost/loaded:")
        );
    }
}
