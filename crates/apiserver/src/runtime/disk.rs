//! Machine disks: a qcow2 overlay whose backing file is the image's ext4 base disk, so
//! creating a machine costs the same whatever the image's size; grown with `qemu-img
//! resize` (the guest grows its filesystem at the next boot). A disk's chain (the overlay and
//! what backs it) is read here from the qcow2 headers, and each backing file must lie in the
//! image store: the VMM may rewrite its disk's header, and the service opens the chain as
//! root to hand it over.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::RuntimeError;
use super::vmm::DiskFormat;

/// The most files a chain may have: an overlay over a base, with room for snapshots.
const MAX_CHAIN: usize = 8;
const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";
/// The qcow2 header extension naming the backing file's format.
const BACKING_FORMAT_EXT: u32 = 0xe279_2aca;

/// A file of a disk's chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainFile {
    pub path: PathBuf,
    pub format: DiskFormat,
}

/// The chain of `disk`, the disk first, then what backs it, each backing file canonical and
/// inside one of `allowed` (canonical directories).
pub fn chain(disk: &Path, allowed: &[PathBuf]) -> Result<Vec<ChainFile>, RuntimeError> {
    let mut files = vec![ChainFile {
        path: disk.to_path_buf(),
        format: format_of(disk)?,
    }];
    loop {
        let last = files.last().expect("the chain starts with the disk");
        if last.format != DiskFormat::Qcow2 {
            return Ok(files);
        }
        let Some((name, format)) = read_backing(&last.path)? else {
            return Ok(files);
        };
        let dir = last.path.parent().unwrap_or(Path::new("/"));
        let named = dir.join(&name);
        let path = std::fs::canonicalize(&named)
            .map_err(RuntimeError::io("finding the backing file", &named))?;
        if !allowed.iter().any(|a| path.starts_with(a)) {
            return Err(RuntimeError::ForeignBacking {
                disk: disk.to_path_buf(),
                backing: path,
            });
        }
        if files.len() == MAX_CHAIN {
            return Err(RuntimeError::DiskChainTooLong {
                disk: disk.to_path_buf(),
                max: MAX_CHAIN,
            });
        }
        let format = match format {
            Some(f) => f,
            None => format_of(&path)?,
        };
        files.push(ChainFile { path, format });
    }
}

fn format_of(path: &Path) -> Result<DiskFormat, RuntimeError> {
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path).map_err(RuntimeError::io("opening", path))?;
    let n = f
        .read(&mut magic)
        .map_err(RuntimeError::io("reading", path))?;
    Ok(match n == 4 && &magic == QCOW2_MAGIC {
        true => DiskFormat::Qcow2,
        false => DiskFormat::Raw,
    })
}

/// The backing file a qcow2 header names, with its format when the header says it.
fn read_backing(path: &Path) -> Result<Option<(PathBuf, Option<DiskFormat>)>, RuntimeError> {
    use std::os::unix::ffi::OsStrExt;
    let bad = |what: &str| RuntimeError::Io {
        what: "reading the qcow2 header of",
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string()),
    };
    // The header, its extensions and the backing name sit in the first cluster; 64 KiB
    // (the smallest usual cluster) is plenty and bounds what is read.
    let mut head = Vec::new();
    std::fs::File::open(path)
        .map_err(RuntimeError::io("opening", path))?
        .take(64 << 10)
        .read_to_end(&mut head)
        .map_err(RuntimeError::io("reading", path))?;
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_be_bytes(head.get(at..at + 4)?.try_into().ok()?))
    };
    let u64_at = |at: usize| -> Option<u64> {
        Some(u64::from_be_bytes(head.get(at..at + 8)?.try_into().ok()?))
    };
    let version = u32_at(4).ok_or_else(|| bad("short header"))?;
    let offset = u64_at(8).ok_or_else(|| bad("short header"))? as usize;
    let size = u32_at(16).ok_or_else(|| bad("short header"))? as usize;
    if offset == 0 || size == 0 {
        return Ok(None);
    }
    let name = head
        .get(offset..offset + size)
        .ok_or_else(|| bad("backing file name out of the first 64 KiB"))?;
    let name = PathBuf::from(std::ffi::OsStr::from_bytes(name));
    // Extensions follow the header (72 bytes in version 2, its length field in version 3).
    let mut at = match version {
        2 => 72,
        _ => u32_at(100).ok_or_else(|| bad("short header"))? as usize,
    };
    let mut format = None;
    while let (Some(kind), Some(len)) = (u32_at(at), u32_at(at + 4)) {
        let len = len as usize;
        if kind == 0 {
            break;
        }
        if kind == BACKING_FORMAT_EXT {
            format = match head.get(at + 8..at + 8 + len) {
                Some(b"raw") => Some(DiskFormat::Raw),
                Some(b"qcow2") => Some(DiskFormat::Qcow2),
                _ => return Err(bad("unsupported backing format")),
            };
        }
        at += 8 + len.div_ceil(8) * 8;
    }
    Ok(Some((name, format)))
}

fn qemu_img(args: &[&std::ffi::OsStr], what: &str) -> Result<(), RuntimeError> {
    let out = super::helpers::clean_env(&mut Command::new("qemu-img"))
        .args(args)
        .output()
        .map_err(|source| RuntimeError::Spawn {
            program: "qemu-img (install the qemu-utils package)".into(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(RuntimeError::CommandFailed {
            what: what.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Creates `disk` as an overlay of `base` with virtual size `size` (at least the base's).
pub fn create_overlay(base: &Path, disk: &Path, size: u64) -> Result<(), RuntimeError> {
    let base_size = std::fs::metadata(base)
        .map_err(RuntimeError::io("reading the base disk", base))?
        .len();
    let size = size.max(base_size);
    qemu_img(
        &[
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-F".as_ref(),
            "raw".as_ref(),
            "-b".as_ref(),
            base.as_os_str(),
            disk.as_os_str(),
            size.to_string().as_ref(),
        ],
        &format!("creating the machine disk {}", disk.display()),
    )
}

/// Grows a disk's virtual size (the guest grows its filesystem at the next boot).
pub fn grow(disk: &Path, size: u64) -> Result<(), RuntimeError> {
    qemu_img(
        &[
            "resize".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            disk.as_os_str(),
            size.to_string().as_ref(),
        ],
        &format!("growing the machine disk {}", disk.display()),
    )
}

/// Bytes the file occupies on the host (allocated blocks, never the apparent size).
pub fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlays_are_small_whatever_the_virtual_size() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.ext4");
        let f = std::fs::File::create(&base).unwrap();
        f.set_len(64 << 20).unwrap();
        let disk = dir.path().join("disk.qcow2");
        create_overlay(&base, &disk, 64 << 30).unwrap();
        assert!(allocated(&disk) < 1 << 20, "{}", allocated(&disk));
        grow(&disk, 128 << 30).unwrap();
        assert!(allocated(&disk) < 1 << 20);
        assert!(
            create_overlay(&dir.path().join("absent"), &dir.path().join("d2"), 1 << 30).is_err()
        );
    }

    #[test]
    fn a_disk_backed_from_outside_the_image_store_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let images = root.join("images");
        let machines = root.join("machines");
        std::fs::create_dir_all(&images).unwrap();
        std::fs::create_dir_all(&machines).unwrap();
        let base = images.join("base.ext4");
        std::fs::File::create(&base)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let disk = machines.join("disk.qcow2");
        create_overlay(&base, &disk, 1 << 30).unwrap();
        assert_eq!(
            chain(&disk, std::slice::from_ref(&images)).unwrap(),
            [
                ChainFile {
                    path: disk.clone(),
                    format: DiskFormat::Qcow2
                },
                ChainFile {
                    path: base.clone(),
                    format: DiskFormat::Raw
                }
            ]
        );
        // A VMM that rewrote its header to be backed by another machine's disk.
        let other = machines.join("other.qcow2");
        create_overlay(&base, &other, 1 << 30).unwrap();
        let evil = machines.join("evil.qcow2");
        qemu_img(
            &[
                "create".as_ref(),
                "-q".as_ref(),
                "-f".as_ref(),
                "qcow2".as_ref(),
                "-F".as_ref(),
                "qcow2".as_ref(),
                "-b".as_ref(),
                other.as_os_str(),
                evil.as_os_str(),
            ],
            "creating",
        )
        .unwrap();
        let err = chain(&evil, &[images]).unwrap_err();
        assert!(matches!(err, RuntimeError::ForeignBacking { .. }), "{err}");
        assert!(err.to_string().contains("other.qcow2"), "{err}");
    }
}
