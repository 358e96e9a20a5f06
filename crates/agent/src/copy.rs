//! Copy sessions: a tar stream from the host unpacked at a path (ownership and modes kept),
//! and a tar of a path streamed to the host. Where a copy lands follows `cp`
//! ([`container_agent_proto::copy`]). The archive's entries stay under the target: absolute
//! paths and `..` are refused.

use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, bail};
use container_agent_proto::copy::{self as semantics, Dest, Placement};
use container_agent_proto::sync::read;
use container_agent_proto::{Frame, Kind, MAX_FRAME, Message};
use vsock::VsockStream;

use crate::wire::{self, Writer, error, reply};

/// Reads the tar stream out of `Data` frames until `DataEof`.
struct FrameReader<'a> {
    stream: &'a mut VsockStream,
    chunk: Vec<u8>,
    at: usize,
    ended: bool,
}

impl Read for FrameReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.chunk.len() {
            if self.ended {
                return Ok(0);
            }
            match read(self.stream).map_err(std::io::Error::other)? {
                Some(Frame::Data(Kind::Data, b)) => {
                    self.chunk = b;
                    self.at = 0;
                }
                Some(Frame::Message(Message::DataEof)) => self.ended = true,
                None => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the service closed the session before the end of the archive",
                    ));
                }
                Some(other) => {
                    return Err(std::io::Error::other(format!(
                        "unexpected frame in an archive: {other:?}"
                    )));
                }
            }
        }
        let n = buf.len().min(self.chunk.len() - self.at);
        buf[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Receives a tar stream and unpacks it at `path`.
pub fn copy_in(path: &str, mut stream: VsockStream, writer: &Writer) -> std::io::Result<()> {
    let mut frames = FrameReader {
        stream: &mut stream,
        chunk: Vec::new(),
        at: 0,
        ended: false,
    };
    let result = unpack(path, &mut frames);
    if result.is_err() {
        // Read the rest so the service sees our answer, not a stalled stream.
        let _ = std::io::copy(&mut frames, &mut std::io::sink());
    }
    match result {
        Ok(()) => reply(writer, Message::Done),
        Err(e) => reply(writer, error(e, None)),
    }
}

/// Where an archive entry goes: under `dir`, its top component renamed to `rename` when
/// given. `None` for entries that would leave `dir`.
fn destination(dir: &Path, entry: &Path, rename: Option<&Path>) -> Option<PathBuf> {
    let mut parts = Vec::new();
    for c in entry.components() {
        match c {
            Component::Normal(p) => parts.push(p),
            Component::CurDir => {}
            _ => return None,
        }
    }
    let mut out = dir.to_path_buf();
    let mut rest = parts.into_iter();
    if let Some(top) = rename {
        rest.next()?;
        out.push(top);
    }
    out.extend(rest);
    Some(out)
}

/// What is at `path`, following symbolic links (a link to a directory is one).
fn found(path: &Path) -> Dest {
    // Without a trailing `/`, which makes a file's metadata fail (ENOTDIR).
    let path: PathBuf = path.components().collect();
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Dest::Dir,
        Ok(_) => Dest::File,
        Err(_) => Dest::Missing,
    }
}

/// Where entries go for a placement: the directory they are unpacked under and the name the
/// top entry takes there, if renamed.
fn target_of(dest: &Path, placement: Placement) -> Result<(PathBuf, Option<PathBuf>)> {
    Ok(match placement {
        Placement::Into => (dest.to_path_buf(), None),
        Placement::ContentsInto => {
            if !dest.is_dir() {
                std::fs::create_dir(dest)
                    .with_context(|| format!("creating {}", dest.display()))?;
            }
            (dest.to_path_buf(), None)
        }
        Placement::As => {
            let parent = dest.parent().unwrap_or(Path::new("/"));
            let name = dest
                .file_name()
                .with_context(|| format!("{} cannot be a copy's destination", dest.display()))?;
            (parent.to_path_buf(), Some(PathBuf::from(name)))
        }
    })
}

/// Unpacks the tar stream `input` at `dest` (as given, a trailing `/` included), placed as
/// `cp` would place the archive's top entry there.
fn unpack(dest_text: &str, input: &mut dyn Read) -> Result<()> {
    let dest = Path::new(dest_text);
    let mut archive = tar::Archive::new(input);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    let mut placed: Option<(PathBuf, Option<PathBuf>)> = None;
    for entry in archive.entries().context("reading the archive")? {
        let mut entry = entry.context("reading the archive")?;
        let name = entry.path().context("reading the archive")?.into_owned();
        let (dir, rename) = match &placed {
            Some(p) => p.clone(),
            None => {
                let top = semantics::archive_top(&name, entry.header().entry_type().is_dir());
                let parent_exists = dest.parent().is_none_or(Path::is_dir);
                let placement = semantics::place(top, dest_text, found(dest), parent_exists)
                    .map_err(|e| anyhow::anyhow!("in the machine: {e}"))?;
                placed.insert(target_of(dest, placement)?).clone()
            }
        };
        let Some(target) = destination(&dir, &name, rename.as_deref()) else {
            bail!(
                "the archive entry {} leaves the destination",
                name.display()
            );
        };
        if target == dir {
            continue;
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        // Without a rename, tar's own containment also resolves hard links in the archive
        // against the destination.
        let written = match &rename {
            None => entry.unpack_in(&dir).map(|_| ()),
            Some(_) => entry.unpack(&target).map(|_| ()),
        };
        // The chain, formatted where the error is answered, carries tar's cause: tar keeps
        // the useful part (the system's error) in the source.
        written.with_context(|| format!("writing {}", target.display()))?;
    }
    Ok(())
}

/// Writes the tar stream as `Data` frames.
struct FrameWriter<'a>(&'a Writer);

impl Write for FrameWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(MAX_FRAME);
        wire::data(self.0, Kind::Data, &buf[..n])?;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Streams a tar of `path`, its base name at the top, then `DataEof`; or an error answer
/// (after whatever part of the archive went out).
pub fn copy_out(path: &str, writer: &Writer) -> std::io::Result<()> {
    match pack(path, writer) {
        Ok(()) => reply(writer, Message::DataEof),
        Err(e) => reply(writer, error(e, None)),
    }
}

fn pack(path: &str, writer: &Writer) -> Result<()> {
    let src = Path::new(path);
    // A trailing `/` or `/.` asks for the directory a link points to, as in `cp`.
    let meta = if path.ends_with('/') || path.ends_with("/.") {
        std::fs::metadata(src)
    } else {
        std::fs::symlink_metadata(src)
    }
    .with_context(|| format!("{path} in the machine"))?;
    let top = semantics::source_top(path, meta.is_dir())
        .map_err(|e| anyhow::anyhow!("in the machine: {e}"))?;
    let name = semantics::top_name(path, top)
        .or_else(|| {
            let real = std::fs::canonicalize(src).ok()?;
            Some(real.file_name()?.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| ".".into());
    let out = std::io::BufWriter::with_capacity(256 * 1024, FrameWriter(writer));
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    let r = if meta.is_dir() {
        builder.append_dir_all(&name, src)
    } else {
        builder.append_path_with_name(src, &name)
    };
    r.and_then(|()| builder.into_inner())
        .and_then(|mut w| w.flush())
        .with_context(|| format!("reading {path}"))
}

/// Directories of the root filesystem whose contents a commit leaves out (the directories
/// themselves are kept): what the kernel, the init and the agent make at each boot.
const COMMIT_EMPTY: &[&str] = &["proc", "sys", "dev", "run", "tmp", "var/host-services"];

/// Streams a tar of the machine's root filesystem for `machine commit`, then `DataEof`; or an
/// error answer (after whatever part went out).
pub fn copy_root(writer: &Writer) -> std::io::Result<()> {
    let out = std::io::BufWriter::with_capacity(256 * 1024, FrameWriter(writer));
    let r =
        pack_root(Path::new("/"), out).and_then(|mut w| w.flush().context("sending the archive"));
    match r {
        Ok(()) => reply(writer, Message::DataEof),
        Err(e) => reply(writer, error(e, None)),
    }
}

/// Writes a tar of the filesystem mounted at `root` to `out`: names relative to `root`, in
/// sorted order; only that filesystem (a mount point is kept as an empty directory); no
/// contents of [`COMMIT_EMPTY`]; a hard link as a link to the first name of its file;
/// sockets left out; files that vanish while the walk runs skipped.
pub fn pack_root<W: Write>(root: &Path, out: W) -> Result<W> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::symlink_metadata(root)
        .with_context(|| format!("reading {}", root.display()))?
        .dev();
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    let mut links: std::collections::HashMap<(u64, u64), PathBuf> = Default::default();
    let mut pending = vec![PathBuf::new()];
    while let Some(dir) = pending.pop() {
        let mut names: Vec<_> = match std::fs::read_dir(root.join(&dir)) {
            Ok(entries) => entries.flatten().map(|e| e.file_name()).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading /{}", dir.display())),
        };
        names.sort();
        // Pushed in reverse so the walk pops them in order.
        let mut subdirs = Vec::new();
        for name in names {
            let rel = dir.join(&name);
            let full = root.join(&rel);
            let meta = match std::fs::symlink_metadata(&full) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e).with_context(|| format!("reading /{}", rel.display())),
            };
            let kind = meta.file_type();
            if std::os::unix::fs::FileTypeExt::is_socket(&kind) {
                continue;
            }
            if kind.is_dir() {
                let mut h = tar::Header::new_gnu();
                h.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
                builder
                    .append_data(&mut h, &rel, std::io::empty())
                    .with_context(|| format!("archiving /{}", rel.display()))?;
                let leave_empty =
                    meta.dev() != dev || COMMIT_EMPTY.iter().any(|e| Path::new(e) == rel.as_path());
                if !leave_empty {
                    subdirs.push(rel);
                }
                continue;
            }
            if kind.is_file() && meta.nlink() > 1 {
                let key = (meta.dev(), meta.ino());
                if let Some(first) = links.get(&key) {
                    let mut h = tar::Header::new_gnu();
                    h.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
                    h.set_entry_type(tar::EntryType::Link);
                    h.set_size(0);
                    builder
                        .append_link(&mut h, &rel, first)
                        .with_context(|| format!("archiving /{}", rel.display()))?;
                    continue;
                }
                links.insert(key, rel.clone());
            }
            match builder.append_path_with_name(&full, &rel) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("archiving /{}", rel.display())),
            }
        }
        pending.extend(subdirs.into_iter().rev());
    }
    builder.into_inner().context("finishing the archive")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_stay_under_the_destination() {
        let d = Path::new("/dst");
        assert_eq!(
            destination(d, Path::new("a/b"), None),
            Some("/dst/a/b".into())
        );
        assert_eq!(
            destination(d, Path::new("./a"), None),
            Some("/dst/a".into())
        );
        assert_eq!(
            destination(d, Path::new("a/b"), Some(Path::new("x"))),
            Some("/dst/x/b".into())
        );
        assert_eq!(destination(d, Path::new("../etc"), None), None);
        assert_eq!(destination(d, Path::new("/etc/passwd"), None), None);
        assert_eq!(destination(d, Path::new("a/../../b"), None), None);
    }

    fn archive(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, body: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o640);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, body).unwrap();
    }

    #[test]
    fn a_tree_lands_in_a_directory_or_under_a_new_name() {
        let dir = tempfile::tempdir().unwrap();
        let tar = archive(|b| {
            file(b, "top/a.txt", b"a");
            file(b, "top/sub/b.txt", b"b");
        });
        let at = |p: &Path| p.display().to_string();
        unpack(&at(dir.path()), &mut tar.as_slice()).unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("top/sub/b.txt")).unwrap(),
            b"b"
        );
        unpack(&at(&dir.path().join("renamed")), &mut tar.as_slice()).unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("renamed/a.txt")).unwrap(),
            b"a"
        );
        let err = unpack(&at(&dir.path().join("no/such/dir")), &mut tar.as_slice()).unwrap_err();
        assert!(
            format!("{err:#}").contains("in the machine: ")
                && format!("{err:#}").contains("no/such does not exist"),
            "{err:#}"
        );
    }

    #[test]
    fn a_failed_write_names_the_file_and_the_system_s_reason() {
        let dir = tempfile::tempdir().unwrap();
        // A directory with something in it where the archive has a file.
        std::fs::create_dir_all(dir.path().join("top/a.txt/inside")).unwrap();
        let tar = archive(|b| file(b, "top/a.txt", b"a"));
        let err = format!(
            "{:#}",
            unpack(&dir.path().display().to_string(), &mut tar.as_slice()).unwrap_err()
        );
        let target = dir.path().join("top/a.txt");
        assert!(
            err.starts_with(&format!("writing {}: ", target.display())),
            "{err}"
        );
        assert!(err.contains("os error"), "{err}");
    }

    #[test]
    fn a_root_archive_keeps_links_and_leaves_runtime_directories_empty() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        for d in ["etc", "proc/1", "tmp", "opt"] {
            std::fs::create_dir_all(r.join(d)).unwrap();
        }
        std::fs::write(r.join("etc/hostname"), "m\n").unwrap();
        std::fs::write(r.join("proc/1/status"), "x").unwrap();
        std::fs::write(r.join("tmp/scratch"), "x").unwrap();
        std::fs::write(r.join("opt/a"), "same").unwrap();
        std::fs::hard_link(r.join("opt/a"), r.join("opt/b")).unwrap();
        symlink("/etc/hostname", r.join("opt/link")).unwrap();
        let _sock = std::os::unix::net::UnixListener::bind(r.join("opt/sock")).unwrap();
        let tar = pack_root(r, Vec::new()).unwrap();
        let mut archive = tar::Archive::new(tar.as_slice());
        let entries: Vec<(String, tar::EntryType)> = archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.path().unwrap().display().to_string(),
                    e.header().entry_type(),
                )
            })
            .collect();
        let names: Vec<&str> = entries.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "etc",
                "opt",
                "proc",
                "tmp",
                "etc/hostname",
                "opt/a",
                "opt/b",
                "opt/link"
            ]
        );
        assert_eq!(entries[6].1, tar::EntryType::Link);
        assert_eq!(entries[7].1, tar::EntryType::Symlink);
    }
}
