//! Applying one layer (an uncompressed tar stream) onto a root directory, following the OCI
//! layer rules: entries replace what is there, `.wh.NAME` deletes NAME, `.wh..wh..opq` hides
//! what lower layers put in a directory.
//!
//! Layers are untrusted input. Every path is resolved by the kernel with `openat2` and
//! `RESOLVE_IN_ROOT`, which treats the root as `/` for every component, `..` and symlink
//! alike, so nothing an archive says — absolute names, `..`, symlinks planted by earlier
//! entries, hardlinks to outside — can reach a file outside the root. Names with `..` are
//! refused outright, as no honest image has them; absolute names are taken relative to the
//! root. Each entry is created in its parent directory's file descriptor, never by path.

use std::collections::HashSet;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Gid, Mode, OFlags, ResolveFlags, Timespec, Timestamps, Uid};

use crate::error::ImageError;
use crate::unpack::Budget;

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";
const AUFS_META: &str = ".wh..wh.";

/// A layer entry's path, made relative and checked: `Ok(None)` for the root itself.
pub fn clean_path(raw: &Path) -> Result<Option<PathBuf>, ImageError> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(ImageError::UnsafeEntry {
                    path: raw.display().to_string(),
                    reason: "it contains `..`",
                });
            }
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

fn io_err<'a>(
    path: &'a Path,
    what: &'static str,
) -> impl FnOnce(rustix::io::Errno) -> ImageError + 'a {
    move |e| ImageError::Apply {
        path: path.display().to_string(),
        what,
        source: std::io::Error::from(e),
    }
}

fn std_err<'a>(
    path: &'a Path,
    what: &'static str,
) -> impl FnOnce(std::io::Error) -> ImageError + 'a {
    move |source| ImageError::Apply {
        path: path.display().to_string(),
        what,
        source,
    }
}

/// Opens `path` inside `root`, resolving every component within it.
fn open_in_root(root: &OwnedFd, path: &Path, flags: OFlags) -> rustix::io::Result<OwnedFd> {
    let path = if path.as_os_str().is_empty() {
        Path::new(".")
    } else {
        path
    };
    rustix::fs::openat2(
        root,
        path,
        flags | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )
}

/// Opens (creating missing ones as root-owned 0755 directories) the parent of `path`.
fn parent_dir(root: &OwnedFd, path: &Path) -> Result<OwnedFd, ImageError> {
    let parent = path.parent().unwrap_or(Path::new(""));
    match open_in_root(root, parent, OFlags::DIRECTORY | OFlags::PATH) {
        Ok(fd) => Ok(fd),
        Err(rustix::io::Errno::NOENT) => {
            // Archives may omit directory entries; make the chain one level at a time.
            let mut made = PathBuf::new();
            for c in parent.components() {
                made.push(c);
                let up = made.parent().unwrap_or(Path::new(""));
                let up_fd = open_in_root(root, up, OFlags::DIRECTORY | OFlags::PATH)
                    .map_err(io_err(&made, "opening a parent directory"))?;
                let name = made.file_name().expect("a normal component");
                match rustix::fs::mkdirat(&up_fd, name, Mode::from_raw_mode(0o755)) {
                    Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                    Err(e) => return Err(io_err(&made, "creating a parent directory")(e)),
                }
            }
            // Still missing: a component is a symlink whose target (resolved inside the
            // root) does not exist. Creating it would be guessing; refuse.
            open_in_root(root, parent, OFlags::DIRECTORY | OFlags::PATH).map_err(|_| {
                ImageError::UnsafeEntry {
                    path: path.display().to_string(),
                    reason: "its parent is a symlink to a directory the image does not have",
                }
            })
        }
        Err(e) => Err(io_err(path, "opening the parent directory")(e)),
    }
}

/// Opens the parent directory of `path` if it exists (resolved inside the root).
fn existing_parent(root: &OwnedFd, path: &Path) -> Result<Option<OwnedFd>, ImageError> {
    let parent = path.parent().unwrap_or(Path::new(""));
    match open_in_root(root, parent, OFlags::DIRECTORY | OFlags::PATH) {
        Ok(fd) => Ok(Some(fd)),
        Err(rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR) => Ok(None),
        Err(e) => Err(io_err(path, "opening the parent directory")(e)),
    }
}

/// The host path of a directory fd (it lies inside the root: it was resolved in it).
fn fd_path(fd: &OwnedFd) -> std::io::Result<PathBuf> {
    use std::os::fd::AsRawFd;
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd()))
}

/// Removes `name` in `dir`, whatever it is (a directory recursively, never following links).
fn remove_entry(dir: &OwnedFd, name: &std::ffi::OsStr, path: &Path) -> Result<(), ImageError> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(io_err(path, "inspecting an existing entry")(e)),
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
            // std's remove_dir_all never follows symlinks (it walks with openat/unlinkat).
            let host = fd_path(dir).map_err(std_err(path, "locating a directory"))?;
            std::fs::remove_dir_all(host.join(name)).map_err(std_err(path, "removing a directory"))
        }
        Ok(_) => rustix::fs::unlinkat(dir, name, AtFlags::empty())
            .map_err(io_err(path, "removing an existing entry")),
    }
}

/// Applies a layer's tar stream onto `root`. Returns the number of entries applied.
pub fn apply_layer<R: Read>(root: &Path, reader: R) -> Result<u64, ImageError> {
    apply_layer_within(root, reader, &Budget::unlimited())
}

/// [`apply_layer`], charging `budget` for the holes of sparse entries, which expand to more
/// than the stream holds (the caller charges the stream itself, see [`Budget::bound`]).
pub fn apply_layer_within<R: Read>(
    root: &Path,
    reader: R,
    budget: &Budget,
) -> Result<u64, ImageError> {
    let root_fd: OwnedFd = rustix::fs::open(
        root,
        OFlags::DIRECTORY | OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io_err(root, "opening the root"))?;
    let mut archive = tar::Archive::new(reader);
    let mut created: HashSet<PathBuf> = HashSet::new();
    let mut dir_times: Vec<(PathBuf, Timestamps)> = Vec::new();
    let mut count = 0;
    let entries = archive
        .entries()
        .map_err(|e| ImageError::Archive { source: e })?;
    for entry in entries {
        let mut entry = entry.map_err(|e| ImageError::Archive { source: e })?;
        let raw = entry
            .path()
            .map_err(|e| ImageError::Archive { source: e })?
            .into_owned();
        let Some(path) = clean_path(&raw)? else {
            continue;
        };
        let name = path
            .file_name()
            .expect("a cleaned path ends in a name")
            .to_owned();
        let name_str = name.to_string_lossy();

        if let Some(hidden) = name_str.strip_prefix(WHITEOUT_PREFIX) {
            // A whiteout hides something in an existing directory; with no directory there is
            // nothing to hide, and nothing is created for it.
            let Some(parent) = existing_parent(&root_fd, &path)? else {
                count += 1;
                continue;
            };
            if name_str == OPAQUE {
                // Hide lower layers' children of this directory, keeping this layer's own.
                let dir_path = path.parent().unwrap_or(Path::new("")).to_path_buf();
                let host = fd_path(&parent).map_err(std_err(&path, "locating a directory"))?;
                for child in
                    std::fs::read_dir(&host).map_err(std_err(&path, "reading a directory"))?
                {
                    let child = child.map_err(std_err(&path, "reading a directory"))?;
                    if !created.contains(&dir_path.join(child.file_name())) {
                        remove_entry(&parent, &child.file_name(), &path)?;
                    }
                }
            } else if name_str.starts_with(AUFS_META) {
                // aufs bookkeeping (`.wh..wh.plnk`…) that some old images carry: meaningless.
            } else {
                if hidden.is_empty() || hidden == "." || hidden == ".." || hidden.contains('/') {
                    return Err(ImageError::UnsafeEntry {
                        path: raw.display().to_string(),
                        reason: "it is a whiteout of no valid name",
                    });
                }
                remove_entry(&parent, std::ffi::OsStr::new(hidden), &path)?;
            }
            count += 1;
            continue;
        }
        let parent = parent_dir(&root_fd, &path)?;

        let header = entry.header().clone();
        let pax = Pax::of(&mut entry);
        let mode = Mode::from_raw_mode(header.mode().unwrap_or(0o644) & 0o7777);
        let uid = pax.uid.unwrap_or_else(|| header.uid().unwrap_or(0)) as u32;
        let gid = pax.gid.unwrap_or_else(|| header.gid().unwrap_or(0)) as u32;
        let mtime = pax
            .mtime
            .unwrap_or_else(|| header.mtime().unwrap_or(0) as i64);
        let times = Timestamps {
            last_access: Timespec {
                tv_sec: mtime,
                tv_nsec: 0,
            },
            last_modification: Timespec {
                tv_sec: mtime,
                tv_nsec: 0,
            },
        };
        let kind = header.entry_type();
        let existing = rustix::fs::statat(&parent, &name, AtFlags::SYMLINK_NOFOLLOW).ok();
        let existing_is_dir =
            existing.is_some_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory);
        // An entry replaces what is there, except a directory over a directory (merge).
        if existing.is_some() && !(kind.is_dir() && existing_is_dir) {
            remove_entry(&parent, &name, &path)?;
        }
        let xattrs = pax.xattrs;
        let owner = (Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)));

        if kind.is_dir() {
            if !existing_is_dir {
                rustix::fs::mkdirat(&parent, &name, mode)
                    .map_err(io_err(&path, "creating a directory"))?;
            }
            let fd = rustix::fs::openat(
                &parent,
                &name,
                OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(io_err(&path, "opening a directory"))?;
            finish(&fd, &path, owner, mode, &times, &xattrs)?;
            // Entries created inside later change its mtime: set it again at the end.
            dir_times.push((path.clone(), times));
        } else if kind.is_file() || kind.is_contiguous() || kind.is_gnu_sparse() {
            if kind.is_gnu_sparse() {
                // Its size is the file's, holes included; its header's, the data stored.
                let stored = header.entry_size().unwrap_or(0);
                budget
                    .charge(entry.size().saturating_sub(stored))
                    .map_err(|source| ImageError::Archive { source })?;
            }
            let fd = rustix::fs::openat(
                &parent,
                &name,
                OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .map_err(io_err(&path, "creating a file"))?;
            let mut file = std::fs::File::from(fd);
            std::io::copy(&mut entry, &mut file).map_err(|e| ImageError::Archive { source: e })?;
            let fd: OwnedFd = file.into();
            finish(&fd, &path, owner, mode, &times, &xattrs)?;
        } else if kind.is_symlink() {
            let target = entry
                .link_name()
                .map_err(|e| ImageError::Archive { source: e })?
                .ok_or_else(|| ImageError::UnsafeEntry {
                    path: raw.display().to_string(),
                    reason: "it is a symlink without a target",
                })?;
            // The target is only text: it is resolved later, inside the machine, or here
            // only through RESOLVE_IN_ROOT.
            rustix::fs::symlinkat(target.as_ref(), &parent, &name)
                .map_err(io_err(&path, "creating a symlink"))?;
            rustix::fs::chownat(&parent, &name, owner.0, owner.1, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(io_err(&path, "setting a symlink's owner"))?;
            rustix::fs::utimensat(&parent, &name, &times, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(io_err(&path, "setting a symlink's times"))?;
        } else if kind.is_hard_link() {
            let target = entry
                .link_name()
                .map_err(|e| ImageError::Archive { source: e })?
                .ok_or_else(|| ImageError::UnsafeEntry {
                    path: raw.display().to_string(),
                    reason: "it is a hardlink without a target",
                })?;
            let target = clean_path(&target)?.ok_or_else(|| ImageError::UnsafeEntry {
                path: raw.display().to_string(),
                reason: "it is a hardlink to the root directory",
            })?;
            // The source is resolved in the root too; its last component is not followed, so
            // a link to a symlink links the symlink itself, as tar means.
            let src_parent =
                existing_parent(&root_fd, &target)?.ok_or_else(|| ImageError::UnsafeEntry {
                    path: raw.display().to_string(),
                    reason: "it is a hardlink to a file the image does not have",
                })?;
            let src_name = target.file_name().expect("a cleaned path ends in a name");
            let src = rustix::fs::openat(
                &src_parent,
                src_name,
                OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(io_err(&path, "opening a hardlink's target"))?;
            let st =
                rustix::fs::fstat(&src).map_err(io_err(&path, "inspecting a hardlink's target"))?;
            if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
                return Err(ImageError::UnsafeEntry {
                    path: raw.display().to_string(),
                    reason: "it is a hardlink to a directory",
                });
            }
            rustix::fs::linkat(&src, "", &parent, &name, AtFlags::EMPTY_PATH)
                .map_err(io_err(&path, "creating a hardlink"))?;
        } else if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
            let file_type = if kind.is_fifo() {
                FileType::Fifo
            } else if kind.is_block_special() {
                FileType::BlockDevice
            } else {
                FileType::CharacterDevice
            };
            let dev = rustix::fs::makedev(
                header.device_major().ok().flatten().unwrap_or(0),
                header.device_minor().ok().flatten().unwrap_or(0),
            );
            rustix::fs::mknodat(&parent, &name, file_type, mode, dev)
                .map_err(io_err(&path, "creating a device node"))?;
            rustix::fs::chownat(&parent, &name, owner.0, owner.1, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(io_err(&path, "setting a node's owner"))?;
            rustix::fs::chmodat(&parent, &name, mode, AtFlags::empty())
                .map_err(io_err(&path, "setting a node's mode"))?;
        } else {
            // PAX/GNU metadata entries are consumed by the tar reader; anything else
            // (sockets, unknown kinds) has no meaning in an image and is skipped.
            continue;
        }
        created.insert(path);
        count += 1;
    }
    // Deepest first, so setting a directory's times does not disturb its parent's.
    for (path, times) in dir_times.iter().rev() {
        if let Ok(fd) = open_in_root(&root_fd, path, OFlags::DIRECTORY | OFlags::RDONLY) {
            let _ = rustix::fs::futimens(&fd, times);
        }
    }
    Ok(count)
}

/// What an entry's PAX extended header says beyond the path: large or precise owner ids and
/// times, and extended attributes (`SCHILY.xattr.NAME`).
#[derive(Debug, Default)]
struct Pax {
    uid: Option<u64>,
    gid: Option<u64>,
    mtime: Option<i64>,
    xattrs: Vec<(String, Vec<u8>)>,
}

impl Pax {
    fn of<R: Read>(entry: &mut tar::Entry<'_, R>) -> Self {
        let mut pax = Pax::default();
        let Ok(Some(exts)) = entry.pax_extensions() else {
            return pax;
        };
        for ext in exts.flatten() {
            let Ok(key) = ext.key() else { continue };
            let value = ext.value().ok();
            match key {
                "uid" => pax.uid = value.and_then(|v| v.parse().ok()),
                "gid" => pax.gid = value.and_then(|v| v.parse().ok()),
                // Fractional seconds are dropped: ext4 keeps them, images do not need them.
                "mtime" => {
                    pax.mtime = value.and_then(|v| v.split('.').next()?.parse().ok());
                }
                _ => {
                    if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                        pax.xattrs
                            .push((name.to_string(), ext.value_bytes().to_vec()));
                    }
                }
            }
        }
        pax
    }
}

/// Sets owner, then mode (chown clears set-id bits), xattrs and times on an open entry.
fn finish(
    fd: &OwnedFd,
    path: &Path,
    owner: (Option<Uid>, Option<Gid>),
    mode: Mode,
    times: &Timestamps,
    xattrs: &[(String, Vec<u8>)],
) -> Result<(), ImageError> {
    rustix::fs::fchown(fd, owner.0, owner.1).map_err(io_err(path, "setting the owner"))?;
    rustix::fs::fchmod(fd, mode).map_err(io_err(path, "setting the mode"))?;
    for (name, value) in xattrs {
        rustix::fs::fsetxattr(fd, name.as_str(), value, rustix::fs::XattrFlags::empty())
            .map_err(io_err(path, "setting an extended attribute"))?;
    }
    rustix::fs::futimens(fd, times).map_err(io_err(path, "setting the times"))
}
