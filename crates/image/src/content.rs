//! The content-addressed blob store: `blobs/sha256/<hex>`, written through `ingest/`.
//!
//! A blob becomes visible only once complete and verified: bytes go to an ingest file while
//! their digest and size are computed; `commit` checks both against what was expected, fsyncs
//! the file, renames it into place and fsyncs the directory (containerd's local store does the
//! same). A crash or kill leaves at worst an ingest file, which `open` removes; a blob present
//! under its name is always whole and correct.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::error::ImageError;

/// Checks a `sha256:<hex>` digest and returns the hex part.
pub fn digest_hex(digest: &str) -> Result<&str, ImageError> {
    let hex = digest
        .strip_prefix("sha256:")
        .ok_or_else(|| ImageError::InvalidDigest(digest.to_string()))?;
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        return Err(ImageError::InvalidDigest(digest.to_string()));
    }
    Ok(hex)
}

/// The digest of a byte slice.
pub fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// The blob store.
#[derive(Debug, Clone)]
pub struct ContentStore {
    blobs: PathBuf,
    ingest: PathBuf,
}

impl ContentStore {
    /// Opens the store under `root`, removing ingest files of interrupted writes.
    pub fn open(root: &Path) -> Result<Self, ImageError> {
        let blobs = root.join("blobs/sha256");
        let ingest = root.join("ingest");
        std::fs::create_dir_all(&blobs).map_err(ImageError::io(&blobs))?;
        if ingest.exists() {
            std::fs::remove_dir_all(&ingest).map_err(ImageError::io(&ingest))?;
        }
        std::fs::create_dir_all(&ingest).map_err(ImageError::io(&ingest))?;
        // Blobs of one user's private image are nobody else's to read: root's alone, the
        // files as the directories (each blob is written 0600 through a temporary file).
        for dir in [root.join("blobs"), blobs.clone(), ingest.clone()] {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .map_err(ImageError::io(&dir))?;
        }
        Ok(Self { blobs, ingest })
    }

    /// Where a blob lives (whether or not it is present).
    pub fn path(&self, digest: &str) -> Result<PathBuf, ImageError> {
        Ok(self.blobs.join(digest_hex(digest)?))
    }

    /// Whether the blob is present (and therefore whole and verified).
    pub fn contains(&self, digest: &str) -> bool {
        self.path(digest).is_ok_and(|p| p.exists())
    }

    /// A blob's bytes; for small blobs (manifests, configs).
    pub fn read(&self, digest: &str) -> Result<Vec<u8>, ImageError> {
        let path = self.path(digest)?;
        std::fs::read(&path).map_err(ImageError::io(&path))
    }

    /// A blob's size in bytes.
    pub fn size(&self, digest: &str) -> Result<u64, ImageError> {
        let path = self.path(digest)?;
        Ok(std::fs::metadata(&path)
            .map_err(ImageError::io(&path))?
            .len())
    }

    /// Starts writing a blob expected to have `digest` and, when known, `size`.
    pub fn writer(
        &self,
        what: &'static str,
        digest: &str,
        size: Option<u64>,
    ) -> Result<BlobWriter, ImageError> {
        digest_hex(digest)?;
        let mut w = self.writer_unnamed(what)?;
        w.expected = Some(digest.to_string());
        w.size = size;
        Ok(w)
    }

    /// Starts writing a blob whose digest is not known in advance (`docker save` layers): it
    /// is stored under the digest of what was written.
    pub fn writer_unnamed(&self, what: &'static str) -> Result<BlobWriter, ImageError> {
        let file =
            tempfile::NamedTempFile::new_in(&self.ingest).map_err(ImageError::io(&self.ingest))?;
        Ok(BlobWriter {
            what,
            expected: None,
            size: None,
            file,
            hasher: Sha256::new(),
            written: 0,
            blobs: self.blobs.clone(),
        })
    }

    /// Reads a blob's bytes from `reader` and checks them against `digest` (and `size`, when
    /// known) without storing them: how an archive proves it holds a blob the store already
    /// has, so naming a digest is never enough to claim another user's image.
    pub fn verify(
        &self,
        what: &'static str,
        digest: &str,
        size: Option<u64>,
        mut reader: impl std::io::Read,
    ) -> Result<(), ImageError> {
        digest_hex(digest)?;
        let mut hasher = Sha256::new();
        let mut written = 0u64;
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(ImageError::Archive { source }),
            };
            written += n as u64;
            hasher.update(&buf[..n]);
        }
        if let Some(expected) = size
            && expected != written
        {
            return Err(ImageError::SizeMismatch {
                what,
                digest: digest.to_string(),
                expected,
                actual: written,
            });
        }
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if actual != digest {
            return Err(ImageError::DigestMismatch {
                what,
                digest: digest.to_string(),
                actual,
            });
        }
        Ok(())
    }

    /// Writes a whole blob held in memory.
    pub fn put(&self, what: &'static str, digest: &str, bytes: &[u8]) -> Result<(), ImageError> {
        if self.contains(digest) {
            return Ok(());
        }
        let mut w = self.writer(what, digest, Some(bytes.len() as u64))?;
        w.write(bytes)?;
        w.commit().map(drop)
    }

    /// Deletes a blob; returns the bytes freed (0 if it was absent).
    pub fn remove(&self, digest: &str) -> Result<u64, ImageError> {
        let path = self.path(digest)?;
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(size),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(ImageError::io(&path)(e)),
        }
    }

    /// Every blob digest present.
    pub fn list(&self) -> Result<Vec<String>, ImageError> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.blobs).map_err(ImageError::io(&self.blobs))? {
            let e = e.map_err(ImageError::io(&self.blobs))?;
            let digest = format!("sha256:{}", e.file_name().to_string_lossy());
            // Anything else in the directory is not ours to list or delete.
            if digest_hex(&digest).is_ok() {
                out.push(digest);
            }
        }
        Ok(out)
    }
}

/// A blob being written; dropped without `commit`, it leaves nothing behind.
#[derive(Debug)]
pub struct BlobWriter {
    what: &'static str,
    expected: Option<String>,
    size: Option<u64>,
    file: tempfile::NamedTempFile,
    hasher: Sha256,
    written: u64,
    blobs: PathBuf,
}

impl BlobWriter {
    /// Appends bytes; fails as soon as more than the expected size arrived.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), ImageError> {
        self.written += bytes.len() as u64;
        if let Some(limit) = self.size
            && self.written > limit
        {
            return Err(ImageError::SizeMismatch {
                what: self.what,
                digest: self.expected.clone().unwrap_or_default(),
                expected: limit,
                actual: self.written,
            });
        }
        self.hasher.update(bytes);
        let path = self.file.path().to_path_buf();
        self.file.write_all(bytes).map_err(ImageError::io(&path))
    }

    /// Copies everything `reader` yields into the blob.
    pub fn write_from(&mut self, mut reader: impl std::io::Read) -> Result<(), ImageError> {
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(ImageError::Archive { source }),
            };
            self.write(&buf[..n])?;
        }
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Verifies size and digest, then makes the blob visible, durably. Returns its digest.
    pub fn commit(self) -> Result<String, ImageError> {
        let actual = format!("sha256:{}", hex::encode(self.hasher.finalize()));
        let expected = self.expected.unwrap_or_else(|| actual.clone());
        if let Some(size) = self.size
            && size != self.written
        {
            return Err(ImageError::SizeMismatch {
                what: self.what,
                digest: expected,
                expected: size,
                actual: self.written,
            });
        }
        if actual != expected {
            return Err(ImageError::DigestMismatch {
                what: self.what,
                digest: expected,
                actual,
            });
        }
        let target = self.blobs.join(digest_hex(&actual)?);
        let path = self.file.path().to_path_buf();
        self.file
            .as_file()
            .sync_all()
            .map_err(ImageError::io(&path))?;
        self.file
            .persist(&target)
            .map_err(|e| ImageError::io(&target)(e.error))?;
        std::fs::File::open(&self.blobs)
            .and_then(|d| d.sync_all())
            .map_err(ImageError::io(&self.blobs))?;
        Ok(actual)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_only_verified_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let good = digest_of(b"hello");
        let mut w = store.writer("blob", &good, Some(5)).unwrap();
        w.write(b"hello").unwrap();
        assert_eq!(w.commit().unwrap(), good);
        let mut w = store.writer_unnamed("blob").unwrap();
        w.write_from(&b"unnamed"[..]).unwrap();
        let named = w.commit().unwrap();
        assert_eq!(named, digest_of(b"unnamed"));
        assert_eq!(store.read(&named).unwrap(), b"unnamed");
        assert_eq!(store.read(&good).unwrap(), b"hello");

        let other = digest_of(b"other");
        let mut w = store.writer("blob", &other, Some(5)).unwrap();
        w.write(b"hellx").unwrap();
        assert!(matches!(w.commit(), Err(ImageError::DigestMismatch { .. })));
        assert!(!store.contains(&other));

        let mut w = store.writer("blob", &other, Some(3)).unwrap();
        assert!(matches!(
            w.write(b"toolong"),
            Err(ImageError::SizeMismatch { .. })
        ));
        drop(w);
        let w = store.writer("blob", &other, Some(5)).unwrap();
        assert!(matches!(w.commit(), Err(ImageError::SizeMismatch { .. })));
        // Nothing is left in the ingest area.
        assert_eq!(
            std::fs::read_dir(dir.path().join("ingest"))
                .unwrap()
                .count(),
            0
        );
    }

    #[test]
    fn digests_are_validated() {
        assert!(digest_hex("sha256:abc").is_err());
        assert!(digest_hex("md5:00").is_err());
        assert!(digest_hex(&format!("sha256:{}", "A".repeat(64))).is_err());
        assert!(digest_hex(&format!("sha256:{}", "../".repeat(21) + "a")).is_err());
        assert!(digest_hex(&digest_of(b"")).is_ok());
    }

    #[test]
    fn interrupted_ingests_are_cleaned_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let w = store.writer("blob", &digest_of(b"x"), None).unwrap();
        std::mem::forget(w);
        ContentStore::open(dir.path()).unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path().join("ingest"))
                .unwrap()
                .count(),
            0
        );
    }
}
