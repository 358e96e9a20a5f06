//! From layers to an ext4 base disk: layers are decompressed and applied in order into a
//! staging directory (see [`layer`]), which `mkfs.ext4 -d` turns into a filesystem image sized
//! to the content. The disk is built in a temporary directory and renamed into place, so a
//! base disk that exists is complete. It is made growable far beyond its size (`-E resize`),
//! because each machine's guest grows it online to the machine's disk size.

pub mod layer;

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

/// Applies `layers` (blob path, compression) into a fresh staging directory under `work` and
/// builds `<dest_dir>/base.ext4` and `<dest_dir>/info.json`.
pub fn build_base_disk(
    layers: &[(PathBuf, Compression)],
    work: &Path,
    dest_dir: &Path,
) -> Result<DiskInfo, ImageError> {
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
    for (path, compression) in layers {
        let reader = layer_reader(path, *compression)?;
        layer::apply_layer(&staging, reader)?;
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

    #[test]
    fn content_that_does_not_fit_is_told_apart_from_other_failures() {
        if Command::new("mkfs.ext4").arg("-V").output().is_err() {
            assert!(
                std::env::var_os("CI").is_none(),
                "mkfs.ext4 is required in CI"
            );
            eprintln!("skipping: mkfs.ext4 is not installed");
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
