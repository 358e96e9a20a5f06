//! `container machine cp`: files and directories between the host and a machine, placed as
//! `cp -r` and `docker cp` place them (`container_agent_proto::copy` decides, for both
//! directions). The host side of the copy runs in this process, as the calling user, so it
//! reads and writes only what the user can; the archive crosses as a tar stream with the
//! source's base name (or `.`, for `DIR/.`) at its top.

use std::path::{Component, Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use container_agent_proto::copy::{self as semantics, Dest, Placement};
use container_api::client::{self, body_stream};
use container_api::{Client, ExitCode};
use futures::StreamExt;

use crate::exit::failed;

#[derive(Debug, Args)]
#[command(
    after_help = "As with cp -r: a file copied onto a missing path becomes it, onto a \
directory goes into it; a directory copied onto a missing path becomes it, onto a directory \
goes into it; SRC/. copies a directory's contents; a destination ending in / must be a \
directory. The destination's parent must exist."
)]
pub struct CpArgs {
    /// Source: a host path or NAME:/path (`DIR/.` for a directory's contents).
    src: String,
    /// Destination: a host path or NAME:/path.
    dst: String,
}

/// One side of a copy.
#[derive(Debug, PartialEq)]
enum Endpoint {
    Host(PathBuf),
    Machine { name: String, path: String },
}

fn parse_endpoint(text: &str) -> Endpoint {
    // `NAME:/abs` names a machine path; anything with a slash before the colon is a host path
    // (`./a:b`), as is a path without a colon.
    match text.split_once(':') {
        Some((name, path))
            if !name.is_empty()
                && !name.contains('/')
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') =>
        {
            Endpoint::Machine {
                name: name.to_string(),
                path: path.to_string(),
            }
        }
        _ => Endpoint::Host(PathBuf::from(text)),
    }
}

fn query(pairs: &[(&str, &str)]) -> String {
    serde_urlencoded::to_string(pairs).expect("string pairs encode")
}

pub async fn run(client: &Client, args: CpArgs) -> anyhow::Result<()> {
    match (parse_endpoint(&args.src), parse_endpoint(&args.dst)) {
        (Endpoint::Host(src), Endpoint::Machine { name, path }) => {
            if !path.starts_with('/') {
                return Err(failed(
                    ExitCode::Usage,
                    format!("the machine path `{path}` must be absolute"),
                ));
            }
            let archive = host_archive(&src, &args.src)?;
            let file = tokio::fs::File::from_std(archive);
            let body = client::stream_body(tokio_util::io::ReaderStream::new(file));
            let _: serde_json::Value = client
                .upload(
                    &format!("/machines/{name}/copy-in?{}", query(&[("path", &path)])),
                    body,
                )
                .await?;
        }
        (Endpoint::Machine { name, path }, Endpoint::Host(dst)) => {
            if !path.starts_with('/') {
                return Err(failed(
                    ExitCode::Usage,
                    format!("the machine path `{path}` must be absolute"),
                ));
            }
            let response = client
                .call_raw::<()>(
                    hyper::Method::GET,
                    &format!("/machines/{name}/copy-out?{}", query(&[("path", &path)])),
                    None,
                )
                .await?;
            // Spool to a temporary file first: the tar reader is synchronous.
            let mut spool = tempfile::tempfile().context("creating a temporary file")?;
            let mut stream = Box::pin(body_stream(response));
            while let Some(chunk) = stream.next().await {
                std::io::Write::write_all(&mut spool, &chunk?)?;
            }
            std::io::Seek::rewind(&mut spool)?;
            extract_to_host(spool, &dst, &args.dst)?;
        }
        (Endpoint::Machine { .. }, Endpoint::Machine { .. }) => {
            return Err(failed(
                ExitCode::Usage,
                "copying between two machines is not supported; copy through the host",
            ));
        }
        (Endpoint::Host(_), Endpoint::Host(_)) => {
            return Err(failed(
                ExitCode::Usage,
                "one side of `cp` must be a machine path, NAME:/path",
            ));
        }
    }
    Ok(())
}

/// Packs `src` (`text` as given) into a temporary tar whose top entry is its base name, or
/// `.` for `DIR/.`.
fn host_archive(src: &Path, text: &str) -> anyhow::Result<std::fs::File> {
    // A trailing `/` or `/.` asks for the directory a link points to, as in `cp`.
    let meta = if text.ends_with('/') || text.ends_with("/.") {
        std::fs::metadata(src)
    } else {
        std::fs::symlink_metadata(src)
    }
    .with_context(|| format!("cannot read {}", src.display()))?;
    let top = semantics::source_top(text, meta.is_dir())
        .map_err(|e| failed(ExitCode::Failure, e.to_string()))?;
    let base = match semantics::top_name(text, top) {
        Some(name) => PathBuf::from(name),
        // `..` and the like: the name of the directory it is.
        None => src
            .canonicalize()?
            .file_name()
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(".")),
    };
    let file = tempfile::tempfile()?;
    let mut builder = tar::Builder::new(file);
    builder.follow_symlinks(false);
    if meta.is_dir() {
        builder.append_dir_all(&base, src)?;
    } else {
        builder.append_path_with_name(src, &base)?;
    }
    let mut file = builder.into_inner()?;
    std::io::Seek::rewind(&mut file)?;
    Ok(file)
}

/// What is at `path`, following symbolic links; a trailing `/` does not count here.
fn found(path: &Path) -> Dest {
    let path: PathBuf = path.components().collect();
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Dest::Dir,
        Ok(_) => Dest::File,
        Err(_) => Dest::Missing,
    }
}

/// Unpacks an archive from a machine at `dst` (`text` as given), placed as `cp` would place
/// its top entry. Entries that would leave the destination are refused.
fn extract_to_host(archive: std::fs::File, dst: &Path, text: &str) -> anyhow::Result<()> {
    let mut tar = tar::Archive::new(archive);
    tar.set_preserve_permissions(true);
    tar.set_overwrite(true);
    // The directory entries go under, and the name the top entry takes there.
    let mut placed: Option<(PathBuf, Option<PathBuf>)> = None;
    for entry in tar.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        if path
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            bail!("refusing archive entry {} from the machine", path.display());
        }
        let (dir, rename) = match &placed {
            Some(p) => p.clone(),
            None => {
                let top = semantics::archive_top(&path, entry.header().entry_type().is_dir());
                let parent = semantics::parent(text).unwrap_or_else(|| ".".into());
                let placement =
                    semantics::place(top, text, found(dst), Path::new(&parent).is_dir())
                        .map_err(|e| failed(ExitCode::Failure, e.to_string()))?;
                placed.insert(host_target(dst, placement)?).clone()
            }
        };
        // The top entry renamed, the rest below it; `.` and empty parts dropped, so a top
        // entry never gains a trailing `/` (which made a file's target a directory).
        let mut parts = path
            .components()
            .filter(|c| matches!(c, Component::Normal(_)));
        let relative: PathBuf = match &rename {
            Some(new_top) => {
                parts.next();
                std::iter::once(new_top.as_os_str())
                    .chain(parts.map(|c| c.as_os_str()))
                    .collect()
            }
            None => parts.collect(),
        };
        if relative.as_os_str().is_empty() {
            // The `.` of `DIR/.`: the destination itself, already there.
            continue;
        }
        // An earlier entry may have planted a symlink: never write through one.
        let mut ancestor = dir.clone();
        for part in relative.parent().into_iter().flat_map(Path::components) {
            ancestor.push(part);
            if std::fs::symlink_metadata(&ancestor).is_ok_and(|m| m.file_type().is_symlink()) {
                bail!(
                    "refusing archive entry {}: it would be written through a symlink",
                    relative.display()
                );
            }
        }
        let target = dir.join(&relative);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        entry
            .unpack(&target)
            .with_context(|| format!("writing {}", target.display()))?;
    }
    Ok(())
}

/// The directory a placement unpacks under on the host, and the top entry's new name.
fn host_target(dst: &Path, placement: Placement) -> anyhow::Result<(PathBuf, Option<PathBuf>)> {
    let dst: PathBuf = dst.components().collect();
    Ok(match placement {
        Placement::Into => (dst, None),
        Placement::ContentsInto => {
            if !dst.is_dir() {
                std::fs::create_dir(&dst).with_context(|| format!("creating {}", dst.display()))?;
            }
            (dst, None)
        }
        Placement::As => {
            let name = dst
                .file_name()
                .with_context(|| format!("invalid destination {}", dst.display()))?;
            let parent = dst
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            (parent.to_path_buf(), Some(PathBuf::from(name)))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_like_docker_cp() {
        assert_eq!(
            parse_endpoint("dev:/etc/hosts"),
            Endpoint::Machine {
                name: "dev".into(),
                path: "/etc/hosts".into()
            }
        );
        assert_eq!(parse_endpoint("./a:b"), Endpoint::Host("./a:b".into()));
        assert_eq!(parse_endpoint("/tmp/x"), Endpoint::Host("/tmp/x".into()));
        assert_eq!(parse_endpoint("Dev:/x"), Endpoint::Host("Dev:/x".into()));
    }
}
