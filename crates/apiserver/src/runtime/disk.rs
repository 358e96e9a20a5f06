//! Machine disks: a qcow2 overlay whose backing file is the image's ext4 base disk, so
//! creating a machine costs the same whatever the image's size; grown with `qemu-img
//! resize` (the guest grows its filesystem at the next boot). A disk's chain (the overlay and
//! what backs it) is read here from the qcow2 headers, and each backing file must lie in the
//! image store: the VMM may rewrite its disk's header, and the service opens the chain as
//! root to hand it over.
//!
//! Clones and snapshots are overlay chains (the host's ext4 has no reflink): a machine's
//! current top is *frozen* into a read-only shared layer under `<root>/layers/` (a hard link
//! taken before an empty overlay over it replaces the top by rename, so the machine's disk
//! is whole at every instant), and whoever shares that point in time (the machine itself,
//! a clone, a snapshot) gets an overlay over the layer. Both steps cost the same whatever
//! the disk holds. Invariants: a layer is never written once frozen; a layer is deleted
//! only by [`collect`], when no chain reachable from a machine disk or a snapshot names it
//! (so `rm` of either side of a clone is safe in any order); a machine's chain is at most
//! [`MAX_CHAIN`] layers deep, beyond which [`flatten`] copies what the layers hold into its
//! top (then the cost is the data's, once).

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::RuntimeError;
use super::vmm::DiskFormat;

/// The most files a chain may have: the top overlay, the shared layers under it (at most
/// [`MAX_CHAIN`] before it is flattened, one more while a flatten is due) and the base.
const MAX_CHAIN_FILES: usize = MAX_CHAIN + 3;
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
        if files.len() == MAX_CHAIN_FILES {
            return Err(RuntimeError::DiskChainTooLong {
                disk: disk.to_path_buf(),
                max: MAX_CHAIN_FILES,
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

/// The deepest chain of shared layers a machine disk may have before it is flattened.
pub const MAX_CHAIN: usize = 8;

/// What the qcow2 header says about an image: its backing file and virtual size. Read from
/// the header itself (QCOW2 spec, big-endian fields at fixed offsets) rather than through
/// `qemu-img info`, which refuses an image a running VMM holds locked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub backing: Option<PathBuf>,
    pub size: u64,
}

/// Reads the qcow2 header of `path`.
pub fn header(path: &Path) -> Result<Header, RuntimeError> {
    use std::io::{Read, Seek, SeekFrom};
    let io = RuntimeError::io("reading the qcow2 header of", path);
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut h = [0u8; 32];
    f.read_exact(&mut h)
        .map_err(RuntimeError::io("reading the qcow2 header of", path))?;
    if &h[0..4] != b"QFI\xfb" {
        return Err(RuntimeError::CommandFailed {
            what: format!("reading the disk {}", path.display()),
            stderr: "not a qcow2 image".into(),
        });
    }
    let be64 = |b: &[u8]| u64::from_be_bytes(b.try_into().expect("8 bytes"));
    let offset = be64(&h[8..16]);
    let len = u32::from_be_bytes(h[16..20].try_into().expect("4 bytes")) as usize;
    let size = be64(&h[24..32]);
    // The spec bounds a backing file name to 1023 bytes.
    let backing = if offset == 0 || len == 0 || len > 1023 {
        None
    } else {
        let mut name = vec![0u8; len];
        f.seek(SeekFrom::Start(offset))
            .and_then(|_| f.read_exact(&mut name))
            .map_err(RuntimeError::io("reading the backing file name of", path))?;
        use std::os::unix::ffi::OsStringExt;
        let name = PathBuf::from(std::ffi::OsString::from_vec(name));
        // Relative names are relative to the image's directory.
        Some(match name.is_absolute() {
            true => name,
            false => path.parent().unwrap_or(Path::new("/")).join(name),
        })
    };
    Ok(Header { backing, size })
}

/// The shared layers under `disk` (those in `layers`), top first; the base disk is not one.
pub fn layers_of(disk: &Path, layers: &Path) -> Result<Vec<PathBuf>, RuntimeError> {
    let mut out = Vec::new();
    let mut at = disk.to_path_buf();
    while let Some(b) = header(&at)?.backing {
        if b.parent() != Some(layers) || out.len() > 64 {
            break;
        }
        out.push(b.clone());
        at = b;
    }
    Ok(out)
}

/// A fresh layer name under `layers`.
pub fn new_layer(layers: &Path) -> PathBuf {
    layers.join(format!("{}.qcow2", random_id()))
}

/// 128 random bits as 32 hex digits (the form of /etc/machine-id).
pub fn random_id() -> String {
    use std::io::Read;
    let mut b = [0u8; 16];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_err()
    {
        // Unique enough for a name when the kernel's pool is unreadable.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b = (t ^ (u128::from(std::process::id()) << 96)).to_be_bytes();
    }
    hex::encode(b)
}

/// Renames `from` over `to` and syncs the directory, so the rename survives a crash.
fn rename_durable(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::rename(from, to)?;
    std::fs::File::open(to.parent().unwrap_or(Path::new("/")))?.sync_all()
}

/// Creates `disk` as an empty overlay over the shared `layer`, of `size` bytes. The layer is
/// not opened (`-u`): a running VMM may hold it locked.
pub fn overlay_on_layer(layer: &Path, disk: &Path, size: u64) -> Result<(), RuntimeError> {
    qemu_img(
        &[
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-F".as_ref(),
            "qcow2".as_ref(),
            "-u".as_ref(),
            "-b".as_ref(),
            layer.as_os_str(),
            disk.as_os_str(),
            size.to_string().as_ref(),
        ],
        &format!("creating the overlay {}", disk.display()),
    )
}

/// Freezes the current top of `disk` into the new shared layer `layer` and puts an empty
/// overlay over it in its place; returns the undo for a caller whose next step failed
/// ([`thaw_top`]). Crash-safe: the top is hard-linked as the layer first, the overlay is
/// written beside the disk and renamed over it, so `disk` names a whole chain throughout.
/// A VMM writing the old top keeps doing so until it is switched to the overlay
/// (`blockdev-snapshot-sync`); until then the layer is not yet shared.
pub fn freeze_top(disk: &Path, layer: &Path) -> Result<(), RuntimeError> {
    let size = header(disk)?.size;
    if let Some(dir) = layer.parent() {
        std::fs::create_dir_all(dir).map_err(RuntimeError::io("creating", dir))?;
        set_mode(dir, 0o700)?;
    }
    std::fs::hard_link(disk, layer).map_err(RuntimeError::io("linking the layer", layer))?;
    let next = disk.with_extension("qcow2.next");
    let _ = std::fs::remove_file(&next);
    let made = overlay_on_layer(layer, &next, size).and_then(|()| set_mode(&next, 0o600));
    if let Err(e) = made {
        let _ = std::fs::remove_file(&next);
        let _ = std::fs::remove_file(layer);
        return Err(e);
    }
    rename_durable(&next, disk).map_err(RuntimeError::io("replacing the disk", disk))?;
    // Readable by root alone, and never written again.
    set_mode(layer, 0o400)
}

/// Undoes [`freeze_top`] while nothing shares the layer yet: the layer is the top again.
pub fn thaw_top(disk: &Path, layer: &Path) -> Result<(), RuntimeError> {
    set_mode(layer, 0o600)?;
    rename_durable(layer, disk).map_err(RuntimeError::io("restoring the disk", disk))
}

/// Copies what the shared layers under `disk` hold into it and makes `base` its backing
/// file again (`qemu-img rebase` in safe mode), so its chain is one overlay deep.
pub fn flatten(disk: &Path, base: &Path) -> Result<(), RuntimeError> {
    qemu_img(
        &[
            "rebase".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-F".as_ref(),
            "raw".as_ref(),
            "-b".as_ref(),
            base.as_os_str(),
            disk.as_os_str(),
        ],
        &format!("flattening the machine disk {}", disk.display()),
    )
}

/// Deletes the layers under `layers` that no chain from `roots` (machine disks, snapshot
/// layers) reaches; returns how many. Roots that cannot be read keep everything: a layer
/// is never deleted on a guess.
pub fn collect(layers: &Path, roots: &[PathBuf]) -> Result<usize, RuntimeError> {
    let entries = match std::fs::read_dir(layers) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(RuntimeError::io("listing", layers)(e)),
    };
    let mut live = std::collections::HashSet::new();
    for root in roots {
        if root.parent() == Some(layers) {
            live.insert(root.clone());
        }
        match layers_of(root, layers) {
            Ok(c) => live.extend(c),
            Err(e) if root.exists() => return Err(e),
            Err(_) => {}
        }
    }
    let mut removed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "qcow2") && !live.contains(&path) {
            std::fs::remove_file(&path).map_err(RuntimeError::io("removing the layer", &path))?;
            removed += 1;
        }
    }
    Ok(removed)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), RuntimeError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(RuntimeError::io("setting the mode of", path))
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

    fn write(disk: &Path, pattern: u8, offset: u64) {
        let ok = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c"])
            .arg(format!("write -P {pattern} {offset} 64k"))
            .arg(disk)
            .output()
            .unwrap();
        assert!(ok.status.success(), "{ok:?}");
    }

    fn reads(disk: &Path, pattern: u8, offset: u64) -> bool {
        Command::new("qemu-io")
            .args(["-r", "-f", "qcow2", "-c"])
            .arg(format!("read -P {pattern} {offset} 64k"))
            .arg(disk)
            .output()
            .map(|o| o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("fail"))
            .unwrap_or(false)
    }

    #[test]
    fn a_frozen_top_is_shared_by_both_sides_and_collected_when_unused() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.ext4");
        std::fs::File::create(&base)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        let layers = dir.path().join("layers");
        let (a, b) = (dir.path().join("a.qcow2"), dir.path().join("b.qcow2"));
        create_overlay(&base, &a, 16 << 20).unwrap();
        write(&a, 1, 0);
        let layer = new_layer(&layers);
        freeze_top(&a, &layer).unwrap();
        overlay_on_layer(&layer, &b, header(&a).unwrap().size).unwrap();
        assert_eq!(header(&b).unwrap().size, 16 << 20);
        assert_eq!(
            layers_of(&a, &layers).unwrap(),
            std::slice::from_ref(&layer)
        );
        // Written before: both see it; after: each its own.
        write(&a, 2, 65536);
        write(&b, 3, 65536);
        assert!(reads(&a, 1, 0) && reads(&b, 1, 0));
        assert!(reads(&a, 2, 65536) && reads(&b, 3, 65536));
        // The clone's new disk costs nothing like the data.
        assert!(allocated(&b) < 1 << 20);
        // Either side may go first; the layer stays while the other needs it.
        std::fs::remove_file(&a).unwrap();
        assert_eq!(collect(&layers, &[a.clone(), b.clone()]).unwrap(), 0);
        assert!(layer.exists());
        std::fs::remove_file(&b).unwrap();
        assert_eq!(collect(&layers, &[]).unwrap(), 1);
        assert!(!layer.exists());
    }

    #[test]
    fn flatten_keeps_the_content_and_drops_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.ext4");
        std::fs::File::create(&base)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        let layers = dir.path().join("layers");
        let a = dir.path().join("a.qcow2");
        create_overlay(&base, &a, 16 << 20).unwrap();
        for i in 0..3u8 {
            write(&a, 10 + i, u64::from(i) * 65536);
            freeze_top(&a, &new_layer(&layers)).unwrap();
        }
        assert_eq!(layers_of(&a, &layers).unwrap().len(), 3);
        flatten(&a, &base).unwrap();
        assert!(layers_of(&a, &layers).unwrap().is_empty());
        assert_eq!(header(&a).unwrap().backing.as_deref(), Some(base.as_path()));
        for i in 0..3u8 {
            assert!(reads(&a, 10 + i, u64::from(i) * 65536));
        }
        assert_eq!(collect(&layers, &[a]).unwrap(), 3);
    }
}
