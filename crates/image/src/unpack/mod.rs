//! From layers to an ext4 base disk: layers are decompressed and applied in order into a
//! staging directory (see [`layer`]), which `mkfs.ext4 -d` turns into a filesystem image sized
//! to the content. The disk is built in a temporary directory and renamed into place, so a
//! base disk that exists is complete. It is made growable far beyond its size (`-E resize`),
//! because each machine's guest grows it online to the machine's disk size.
//!
//! What layers expand to is bounded: a few kilobytes of gzip or zstd can decompress to
//! terabytes, and a sparse tar entry can claim any size. Every decompressed byte and every
//! byte of sparse holes is charged to one [`Budget`] per build, the smaller of the store's
//! maximum ([`crate::store::Limits`]) and half the space free where the build runs (the
//! staging tree and the disk each hold the content), so a hostile image fails with a clear
//! error before it fills the disk running machines' overlays live on.

pub mod layer;

use std::cell::Cell;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use rustix::fs::{Mode, OFlags, ResolveFlags};
use serde::{Deserialize, Serialize};

use crate::error::ImageError;
use crate::manifest::Compression;

/// The result of building a base disk, stored beside it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// Whether `/sbin/init` resolves (within the image) to an executable regular file.
    pub has_init: bool,
    /// Bytes of file content in the image.
    pub content_bytes: u64,
    /// Virtual size of the base disk.
    pub disk_bytes: u64,
}

/// Bytes the layers of one build may expand to, shared by all of them.
#[derive(Debug)]
pub struct Budget {
    limit: u64,
    used: Cell<u64>,
}

impl Budget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Self {
        Self {
            limit,
            used: Cell::new(0),
        }
    }

    /// No limit (for callers that bound their input otherwise).
    pub fn unlimited() -> Self {
        Self::new(u64::MAX)
    }

    /// Takes `n` bytes; an error once more than the limit has been asked for in all.
    pub fn charge(&self, n: u64) -> std::io::Result<()> {
        let used = self.used.get().saturating_add(n);
        self.used.set(used);
        if used > self.limit {
            return Err(std::io::Error::new(
                std::io::ErrorKind::FileTooLarge,
                format!("the layers expand past the limit of {} bytes", self.limit),
            ));
        }
        Ok(())
    }

    /// Whether more than the limit was asked for.
    pub fn exceeded(&self) -> bool {
        self.used.get() > self.limit
    }

    /// Bytes charged so far.
    pub fn used(&self) -> u64 {
        self.used.get()
    }

    /// Bytes allowed in all.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// `reader`, charging this budget for every byte it yields.
    pub fn bound<R: Read>(&self, reader: R) -> Bounded<'_, R> {
        Bounded {
            inner: reader,
            budget: self,
        }
    }
}

/// A reader that charges a [`Budget`] for what it yields and fails once it is spent.
#[derive(Debug)]
pub struct Bounded<'a, R> {
    inner: R,
    budget: &'a Budget,
}

impl<R: Read> Read for Bounded<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        // Never read past the limit: a bomb stops within one buffer of it.
        let room = self.budget.limit.saturating_sub(self.budget.used()) as usize;
        let want = buf.len().min(room.saturating_add(1));
        let n = self.inner.read(&mut buf[..want])?;
        self.budget.charge(n as u64)?;
        Ok(n)
    }
}

/// One layer blob of an image, as the store holds it.
#[derive(Debug, Clone)]
pub struct LayerBlob {
    pub digest: String,
    pub path: PathBuf,
    pub compression: Compression,
}

/// Where a build's budget came from, for the error when it is spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BudgetSource {
    /// The store's configured maximum.
    Maximum,
    /// Half the space free in the work directory.
    FreeSpace,
}

/// Bytes free in the filesystem holding `dir`, not counting the blocks reserved for root
/// (the service is root, but those are for keeping the host alive).
fn free_bytes(dir: &Path) -> Result<u64, ImageError> {
    let st = rustix::fs::statvfs(dir).map_err(|e| ImageError::io(dir)(e.into()))?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Opens a layer blob with its decompressor.
pub fn layer_reader(path: &Path, compression: Compression) -> Result<Box<dyn Read>, ImageError> {
    let file = std::fs::File::open(path).map_err(ImageError::io(path))?;
    let file = std::io::BufReader::new(file);
    Ok(match compression {
        Compression::None => Box::new(file),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(file)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(file)
                .map_err(|e| ImageError::Archive { source: e })?,
        ),
    })
}

/// Whether `/sbin/init` in `root` is an executable regular file, following symlinks inside
/// the root only.
pub fn has_init(root: &Path) -> bool {
    let Ok(root_fd) = rustix::fs::open(root, OFlags::DIRECTORY | OFlags::PATH, Mode::empty())
    else {
        return false;
    };
    let Ok(fd) = rustix::fs::openat2(
        &root_fd,
        "sbin/init",
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    ) else {
        return false;
    };
    rustix::fs::fstat(&fd).is_ok_and(|st| {
        rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile
            && st.st_mode & 0o111 != 0
    })
}

/// Sums file sizes and counts inodes under `dir` (not following symlinks).
fn measure(dir: &Path) -> std::io::Result<(u64, u64)> {
    let mut bytes = 0;
    let mut inodes = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let m = e.metadata()?;
            inodes += 1;
            // Rounded up to blocks: that is what they take on ext4.
            bytes += m.len().div_ceil(4096) * 4096;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Ok((bytes, inodes))
}

/// Applies the `layers` of `image` (a name for errors) into a fresh staging directory under
/// `work` and builds `<dest_dir>/base.ext4` and `<dest_dir>/info.json`. The layers may expand
/// to `max_unpacked` bytes, or half the space free in `work` if that is less.
pub fn build_base_disk(
    image: &str,
    layers: &[LayerBlob],
    work: &Path,
    dest_dir: &Path,
    max_unpacked: u64,
) -> Result<DiskInfo, ImageError> {
    let half_free = free_bytes(work)? / 2;
    let (budget, source) = if half_free < max_unpacked {
        (Budget::new(half_free), BudgetSource::FreeSpace)
    } else {
        (Budget::new(max_unpacked), BudgetSource::Maximum)
    };
    let tmp = tempfile::Builder::new()
        .prefix(".build-")
        .tempdir_in(work)
        .map_err(ImageError::io(work))?;
    let staging = tmp.path().join("rootfs");
    std::fs::create_dir(&staging).map_err(ImageError::io(&staging))?;
    // The root directory of an image is root-owned 0755 whatever the layers say.
    std::fs::set_permissions(
        &staging,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .map_err(ImageError::io(&staging))?;
    for l in layers {
        let reader = budget.bound(layer_reader(&l.path, l.compression)?);
        match layer::apply_layer_within(&staging, reader, &budget) {
            // Whatever error the archive reader made of it, the budget is why.
            Err(_) if budget.exceeded() => {
                return Err(over_budget(image, l, work, &budget, source));
            }
            r => r?,
        };
    }
    let has_init = has_init(&staging);
    let (content, inodes) = measure(&staging).map_err(ImageError::io(&staging))?;
    // Room for metadata and the journal, plus slack so the image boots before it is grown.
    // Room for metadata and the journal, plus slack so the image boots before it is grown.
    let mut disk_bytes =
        (content + content / 4 + inodes * 512 + (160 << 20)).div_ceil(1 << 20) << 20;
    let image = tmp.path().join("base.ext4");
    let inode_count = (inodes * 2).max(16384);
    // The estimate can fall short (many xattrs, huge directories): grow it and try again.
    let mut attempt = 0;
    loop {
        match mkfs(&staging, &image, disk_bytes, inode_count)? {
            MkfsOutcome::Done => break,
            MkfsOutcome::NoSpace(_) if attempt < 3 => {
                attempt += 1;
                disk_bytes += disk_bytes / 2;
            }
            MkfsOutcome::NoSpace(message) | MkfsOutcome::Failed(message) => {
                return Err(ImageError::Mkfs(message));
            }
        }
    }
    // The disk holds the whole image, private ones included: root's alone, as its directory.
    set_mode(&image, 0o600)?;
    set_mode(tmp.path(), 0o700)?;
    std::fs::File::open(&image)
        .and_then(|f| f.sync_all())
        .map_err(ImageError::io(&image))?;
    let info = DiskInfo {
        has_init,
        content_bytes: content,
        disk_bytes,
    };
    let info_path = tmp.path().join("info.json");
    crate::fsutil::write_json(&info_path, &info).map_err(ImageError::io(&info_path))?;
    // Staging goes before the rename so only the disk and its info move into place.
    std::fs::remove_dir_all(&staging).map_err(ImageError::io(&staging))?;
    if dest_dir.exists() {
        std::fs::remove_dir_all(dest_dir).map_err(ImageError::io(dest_dir))?;
    }
    let kept = tmp.keep();
    std::fs::rename(&kept, dest_dir).map_err(ImageError::io(dest_dir))?;
    if let Some(disks) = dest_dir.parent() {
        std::fs::File::open(disks)
            .and_then(|d| d.sync_all())
            .map_err(ImageError::io(disks))?;
    }
    Ok(info)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(ImageError::io(path))
}

/// The error for a build whose layers expanded past its budget.
fn over_budget(
    image: &str,
    layer: &LayerBlob,
    work: &Path,
    budget: &Budget,
    source: BudgetSource,
) -> ImageError {
    let (what, advice) = match source {
        BudgetSource::Maximum => (
            format!("unpacking {image} stopped in layer {}", layer.digest),
            "the image expands to more than the store accepts (a decompression bomb, or an \
             image bigger than a machine disk); use another image",
        ),
        BudgetSource::FreeSpace => (
            format!(
                "unpacking {image} stopped in layer {} (the limit is half the space free in {})",
                layer.digest,
                work.display()
            ),
            "free disk space there (unpacking needs room for the files and the disk built \
             from them) and pull again, or use a smaller image",
        ),
    };
    ImageError::TooLarge {
        what,
        size: budget.used(),
        limit: budget.limit(),
        unit: "bytes",
        advice,
    }
}

/// What one `mkfs.ext4` run gave.
enum MkfsOutcome {
    Done,
    /// The content did not fit.
    NoSpace(String),
    Failed(String),
}

/// Makes `image` (`bytes` long) an ext4 filesystem holding `staging`: 4 KiB blocks, labelled
/// `root` for the agent, root-owned root directory, and room to grow online to 16 TiB
/// (`-E resize`), since every machine's guest grows it to the machine's disk size.
fn mkfs(staging: &Path, image: &Path, bytes: u64, inodes: u64) -> Result<MkfsOutcome, ImageError> {
    let file = std::fs::File::create(image).map_err(ImageError::io(image))?;
    file.set_len(bytes).map_err(ImageError::io(image))?;
    drop(file);
    let resize_blocks: u64 = (16u64 << 40) / 4096;
    let out = Command::new("mkfs.ext4")
        .args([
            "-F", "-q", "-L", "root", "-b", "4096", "-J", "size=64", "-N",
        ])
        .arg(inodes.to_string())
        .arg("-E")
        .arg(format!("resize={resize_blocks},root_owner=0:0"))
        .arg("-d")
        .arg(staging)
        .arg(image)
        .output()
        .map_err(|e| ImageError::Mkfs(format!("cannot run mkfs.ext4 (install e2fsprogs): {e}")))?;
    if out.status.success() {
        return Ok(MkfsOutcome::Done);
    }
    let message = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let full = [
        "No space left",
        "Could not allocate",
        "no free space",
        "journal size too big",
    ]
    .iter()
    .any(|m| message.contains(m));
    Ok(if full {
        MkfsOutcome::NoSpace(message)
    } else {
        MkfsOutcome::Failed(message)
    })
}

/// Bytes a file occupies on disk (allocated blocks, not its apparent size).
pub fn allocated_bytes(path: &Path) -> u64 {
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar with one file of `size` zero bytes.
    fn zeros_tar(size: u64) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_path("zeros").unwrap();
        h.set_mode(0o644);
        h.set_size(size);
        h.set_cksum();
        b.append(&h, std::io::repeat(0).take(size)).unwrap();
        b.into_inner().unwrap()
    }

    /// A tar with one GNU sparse file claiming `real_size` bytes, of which 512 are stored.
    fn sparse_tar(real_size: u64) -> Vec<u8> {
        let mut h = tar::Header::new_gnu();
        h.set_path("sparse").unwrap();
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::GNUSparse);
        h.set_size(512);
        let gnu = h.as_gnu_mut().unwrap();
        gnu.sparse[0].set_offset(real_size - 512);
        gnu.sparse[0].set_length(512);
        gnu.set_real_size(real_size);
        h.set_cksum();
        let mut out = h.as_bytes().to_vec();
        out.extend_from_slice(&[0x5a; 512]);
        out.extend_from_slice(&[0; 1024]);
        out
    }

    fn blob(dir: &Path, name: &str, bytes: &[u8], compression: Compression) -> LayerBlob {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        LayerBlob {
            digest: crate::content::digest_of(bytes),
            path,
            compression,
        }
    }

    #[test]
    fn layers_that_expand_past_the_budget_are_refused_before_they_fill_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join("work");
        std::fs::create_dir(&work).unwrap();
        let dest = dir.path().join("disk");
        let bomb = zeros_tar(64 << 20);
        let gzip = {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            std::io::Write::write_all(&mut e, &bomb).unwrap();
            e.finish().unwrap()
        };
        let zstd = zstd::encode_all(bomb.as_slice(), 19).unwrap();
        assert!(gzip.len() < 1 << 20 && zstd.len() < 1 << 20);
        let small = blob(dir.path(), "small", &zeros_tar(1 << 20), Compression::None);
        for (name, bytes, compression) in [
            ("gzip", gzip, Compression::Gzip),
            ("zstd", zstd, Compression::Zstd),
            ("sparse", sparse_tar(1 << 40), Compression::None),
        ] {
            let bomb = blob(dir.path(), name, &bytes, compression);
            let layers = [small.clone(), bomb.clone()];
            let e = build_base_disk("test/bomb:1", &layers, &work, &dest, 8 << 20).unwrap_err();
            let ImageError::TooLarge { what, limit, .. } = &e else {
                panic!("{name}: {e}");
            };
            assert_eq!(*limit, 8 << 20, "{name}");
            assert!(
                what.contains("test/bomb:1") && what.contains(&bomb.digest),
                "{name}: the error names neither the image nor the layer: {e}"
            );
            assert!(e.to_string().contains("decompression bomb"), "{name}: {e}");
            assert!(!dest.exists(), "{name}: a disk was left");
            assert_eq!(std::fs::read_dir(&work).unwrap().count(), 0, "{name}");
        }
    }

    #[test]
    fn budgets_stop_reads_at_their_limit() {
        let budget = Budget::new(1000);
        let mut first = Vec::new();
        budget
            .bound(std::io::repeat(1).take(600))
            .read_to_end(&mut first)
            .unwrap();
        assert_eq!(first.len(), 600);
        let mut second = Vec::new();
        let e = budget
            .bound(std::io::repeat(1))
            .read_to_end(&mut second)
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::FileTooLarge);
        assert!(budget.exceeded());
        assert!(second.len() <= 400, "read {} past the limit", second.len());
        // Exactly the limit is not over it.
        let exact = Budget::new(10);
        let mut all = Vec::new();
        exact
            .bound(std::io::repeat(1).take(10))
            .read_to_end(&mut all)
            .unwrap();
        assert!(!exact.exceeded());
    }

    #[test]
    fn content_that_does_not_fit_is_told_apart_from_other_failures() {
        if !container_testkit::have("mkfs.ext4") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let staging = dir.path().join("rootfs");
        std::fs::create_dir(&staging).unwrap();
        std::fs::write(staging.join("big"), vec![0x5a; 100 << 20]).unwrap();
        let image = dir.path().join("disk");
        assert!(matches!(
            mkfs(&staging, &image, 96 << 20, 1024).unwrap(),
            MkfsOutcome::NoSpace(_)
        ));
        assert!(matches!(
            mkfs(&dir.path().join("absent"), &image, 256 << 20, 1024).unwrap(),
            MkfsOutcome::Failed(_)
        ));
        assert!(matches!(
            mkfs(&staging, &image, 256 << 20, 1024).unwrap(),
            MkfsOutcome::Done
        ));
    }
}
