//! Machine disks: a qcow2 overlay whose backing file is the image's ext4 base disk, so
//! creating a machine costs the same whatever the image's size; grown with `qemu-img
//! resize` (the guest grows its filesystem at the next boot).

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use super::RuntimeError;

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
}
