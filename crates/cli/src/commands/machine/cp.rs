//! `container machine cp`: files and directories between the host and a machine. The host side
//! of the copy runs in this process, as the calling user, so it reads and writes only what the
//! user can; the archive crosses as a tar stream with the source's base name at its top.

use std::path::{Component, Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use container_api::client::{self, body_stream};
use container_api::{Client, ExitCode};
use futures::StreamExt;

use crate::exit::failed;

#[derive(Debug, Args)]
pub struct CpArgs {
    /// Source: a host path or NAME:/path.
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
            let archive = host_archive(&src)?;
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
            extract_to_host(spool, &dst)?;
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

/// Packs `src` into a temporary tar whose top entry is `src`'s base name.
fn host_archive(src: &Path) -> anyhow::Result<std::fs::File> {
    let meta =
        std::fs::symlink_metadata(src).with_context(|| format!("cannot read {}", src.display()))?;
    let base = src
        .canonicalize()?
        .file_name()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("root"));
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

/// Unpacks an archive from a machine. Into `dst` when it is an existing directory; otherwise
/// the top entry becomes `dst`. Entries that would leave the destination are refused.
fn extract_to_host(archive: std::fs::File, dst: &Path) -> anyhow::Result<()> {
    let (dir, rename) = if dst.is_dir() {
        (dst.to_path_buf(), None)
    } else {
        let parent = dst
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !parent.is_dir() {
            bail!(
                "the destination directory {} does not exist",
                parent.display()
            );
        }
        let name = dst
            .file_name()
            .with_context(|| format!("invalid destination {}", dst.display()))?;
        (parent.to_path_buf(), Some(PathBuf::from(name)))
    };
    let mut tar = tar::Archive::new(archive);
    tar.set_preserve_permissions(true);
    tar.set_overwrite(true);
    for entry in tar.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        if path
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            bail!("refusing archive entry {} from the machine", path.display());
        }
        let relative = match &rename {
            Some(new_top) => {
                let mut parts = path.components();
                parts.next();
                new_top.join(parts.as_path())
            }
            None => path,
        };
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
