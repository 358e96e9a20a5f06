//! Removing images and collecting garbage, marked from the roots (containerd's model): every
//! reference of every namespace, every digest held by a lease of an operation in flight, and,
//! for base disks only, the manifests the caller says machines use. Whatever no root reaches —
//! blobs and base disks — is deleted. Content is shared between namespaces, so one user's
//! `rm` deletes nothing another user's name still reaches.
//!
//! Machines are the caller's business, so `remove` takes them as an argument: removing the last
//! reference the remover sees to an image one of their machines was created from is refused
//! with [`ImageError::InUse`] unless forced; forced, the reference and the blobs go but the
//! base disk stays as long as any machine uses it (machine disks are overlays backed by it)
//! and goes with a later collection.

use std::collections::{BTreeMap, BTreeSet};

use crate::error::ImageError;
use crate::store::{ImageStore, Namespace, Refs, Removed};
use crate::unpack;

impl ImageStore {
    /// Removes a reference of `namespace` (or, given a digest, every reference it has to that
    /// image), then deletes what no namespace's name or machine needs. A system name a user
    /// sees is not theirs to remove ([`ImageError::SystemImage`]). `in_use` maps manifest
    /// digests to the machines created from them: every machine's digest, so collection keeps
    /// their base disks, with the names of only those machines the remover may see (an entry
    /// without names never refuses); see the module documentation for what `force` does.
    pub fn remove(
        &self,
        namespace: Namespace,
        wanted: &str,
        in_use: &BTreeMap<String, Vec<String>>,
        force: bool,
    ) -> Result<Removed, ImageError> {
        let _g = self.guard();
        let mut refs = self.load_refs()?;
        let visible = refs.visible(namespace);
        let (reference, named) = self.resolve(&visible, wanted)?;
        let digest = named.digest.clone();
        let own = refs.names(namespace);
        let untag: Vec<String> = if self.is_digest_lookup(&visible, wanted) {
            own.iter()
                .filter(|(_, d)| **d == digest)
                .map(|(r, _)| r.clone())
                .collect()
        } else if named.namespace == namespace {
            vec![reference.clone()]
        } else {
            Vec::new()
        };
        if untag.is_empty() {
            return Err(ImageError::SystemImage(reference));
        }
        let remaining = visible.values().filter(|n| n.digest == digest).count() - untag.len();
        if remaining == 0
            && !force
            && let Some(machines) = in_use.get(&digest).filter(|m| !m.is_empty())
        {
            return Err(ImageError::InUse {
                reference,
                machines: machines.join(", "),
            });
        }
        let names = refs.names_mut(namespace);
        for r in &untag {
            names.remove(r);
        }
        self.save_refs(&refs)?;
        let mut removed = self.collect(&refs, in_use)?;
        removed.untagged = untag;
        Ok(removed)
    }

    /// Deletes unreferenced blobs and base disks now; returns what went.
    pub fn collect_garbage(
        &self,
        in_use: &BTreeMap<String, Vec<String>>,
    ) -> Result<Removed, ImageError> {
        let _g = self.guard();
        let refs = self.load_refs()?;
        self.collect(&refs, in_use)
    }

    /// What the images `namespace` sees hold on disk, each blob and base disk counted once,
    /// and what untagging its own names `untag` would free, exactly as [`remove`](Self::remove)
    /// of each would (blobs and base disks no other name or machine needs): the figures of
    /// `system df`, the second the bytes `image prune --all` reclaims. Changes nothing.
    pub fn usage(
        &self,
        namespace: Namespace,
        untag: &[String],
        in_use: &BTreeMap<String, Vec<String>>,
    ) -> Result<Usage, ImageError> {
        let _g = self.guard();
        let mut refs = self.load_refs()?;
        let manifests: BTreeSet<String> = refs
            .visible(namespace)
            .into_values()
            .map(|n| n.digest)
            .collect();
        let mut usage = Usage::default();
        for digest in self.reach(manifests.iter().cloned()) {
            usage.bytes += self.content.size(&digest).unwrap_or(0);
        }
        for digest in &manifests {
            usage.bytes += unpack::allocated_bytes(&self.disk_dir(digest)?.join("base.ext4"));
        }
        let names = refs.names_mut(namespace);
        for r in untag {
            names.remove(r);
        }
        usage.reclaimable = self.garbage(&refs, in_use)?.bytes;
        Ok(usage)
    }

    /// The blobs `manifests` reach: each manifest, its config and its layers.
    fn reach(&self, manifests: impl IntoIterator<Item = String>) -> BTreeSet<String> {
        let mut live = BTreeSet::new();
        for digest in manifests {
            live.insert(digest.clone());
            // Leases also hold configs and layers, which are not manifests (and may be large).
            let small = self
                .content
                .size(&digest)
                .is_ok_and(|s| s <= crate::manifest::MAX_JSON);
            if small && let Ok(m) = self.manifest_of(&digest) {
                live.insert(m.config.digest.clone());
                live.extend(m.layers.iter().map(|l| l.digest.clone()));
            }
        }
        live
    }

    /// Marks from the roots: the blobs and base disks nothing reaches, with their bytes. The
    /// caller holds the store lock.
    fn garbage(
        &self,
        refs: &Refs,
        in_use: &BTreeMap<String, Vec<String>>,
    ) -> Result<Garbage, ImageError> {
        let live = self.reach(refs.digests().into_iter().chain(self.leased()));
        let mut garbage = Garbage::default();
        for blob in self.content.list()? {
            if !live.contains(&blob) {
                garbage.bytes += self.content.size(&blob).unwrap_or(0);
                garbage.blobs.push(blob);
            }
        }
        let disks = self.root.join("disks");
        for e in std::fs::read_dir(&disks)
            .map_err(ImageError::io(&disks))?
            .flatten()
        {
            let digest = format!("sha256:{}", e.file_name().to_string_lossy());
            if !live.contains(&digest) && !in_use.contains_key(&digest) {
                garbage.bytes += unpack::allocated_bytes(&e.path().join("base.ext4"));
                garbage.disks.push(e.path());
            }
        }
        Ok(garbage)
    }

    /// Marks from the roots and sweeps; the caller holds the store lock.
    fn collect(
        &self,
        refs: &Refs,
        in_use: &BTreeMap<String, Vec<String>>,
    ) -> Result<Removed, ImageError> {
        let garbage = self.garbage(refs, in_use)?;
        let mut removed = Removed::default();
        for blob in garbage.blobs {
            removed.freed_bytes += self.content.remove(&blob)?;
            removed.deleted.push(blob);
        }
        for dir in garbage.disks {
            removed.freed_bytes += unpack::allocated_bytes(&dir.join("base.ext4"));
            std::fs::remove_dir_all(&dir).map_err(ImageError::io(&dir))?;
        }
        Ok(removed)
    }
}

/// What a collection would delete.
#[derive(Debug, Default)]
struct Garbage {
    blobs: Vec<String>,
    /// Base disk directories.
    disks: Vec<std::path::PathBuf>,
    /// Bytes of the blobs and the base disks' allocated bytes.
    bytes: u64,
}

/// What images take on disk ([`ImageStore::usage`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes of the blobs and base disks the images hold.
    pub bytes: u64,
    /// Bytes untagging the names given would free.
    pub reclaimable: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::content::digest_of;

    #[test]
    fn leased_blobs_survive_collection_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let digest = digest_of(b"a layer a pull is still fetching");
        store
            .content
            .put("layer", &digest, b"a layer a pull is still fetching")
            .unwrap();
        let mut lease = store.lease();
        lease.add(&digest);
        let mut second = store.lease();
        second.add(&digest);
        let none = BTreeMap::new();
        assert!(store.collect_garbage(&none).unwrap().deleted.is_empty());
        drop(lease);
        assert!(store.collect_garbage(&none).unwrap().deleted.is_empty());
        drop(second);
        assert_eq!(store.collect_garbage(&none).unwrap().deleted, [digest]);
    }
}
