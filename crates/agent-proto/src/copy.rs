//! Where a copied tree lands: the semantics of `cp -r` and `docker cp`, decided once for both
//! directions of `container machine cp` (the agent unpacks into the machine, the CLI onto the
//! host). A copy crosses as a tar stream whose top entry is the source's base name, or `.`
//! when the source was `DIR/.` (its contents); the side that unpacks decides from that top
//! entry and what is at the destination:
//!
//! | source | destination missing | existing file | existing directory |
//! |---|---|---|---|
//! | file | becomes the file (`DEST/`: error, no such directory) | overwritten (`DEST/`: error) | copied into it |
//! | directory | created with the source's contents | error | copied into it |
//! | `DIR/.` | created with the contents | error | the contents copied into it |
//!
//! The destination's parent must exist: nothing but the destination itself is created.

use std::path::Path;

/// What a copy's archive holds at its top.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Top {
    /// A file (or a symbolic link, a device…): anything but a directory.
    File,
    /// A directory, under its own name.
    Dir,
    /// A directory's contents (the source was `DIR/.`): the top entry is `.`.
    Contents,
}

/// What is at the destination path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dest {
    Missing,
    File,
    Dir,
}

/// Where the archive goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Into the destination directory, under the top entry's own name.
    Into,
    /// As the destination itself: the top entry renamed to the destination's base name, in
    /// its parent.
    As,
    /// The top directory's contents into the destination, created when missing.
    ContentsInto,
}

/// Why a copy cannot go where it was asked to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CopyError {
    #[error("{0}: no such directory (a destination ending in `/` must be an existing directory)")]
    NoSuchDirectory(String),
    #[error("{0} is not a directory")]
    NotADirectory(String),
    #[error("cannot copy a directory onto {0}, which is a file")]
    DirOntoFile(String),
    #[error("{0} does not exist (cp creates the destination, not its parents)")]
    MissingParent(String),
}

/// The top of the archive for a source path as given (`DIR/.` copies the contents, a trailing
/// `/` asks for a directory), `is_dir` saying what the path is.
pub fn source_top(path: &str, is_dir: bool) -> Result<Top, CopyError> {
    let contents = path == "." || path.ends_with("/.");
    match (is_dir, contents || path.ends_with('/')) {
        (false, true) => Err(CopyError::NotADirectory(path.to_string())),
        (true, _) if contents => Ok(Top::Contents),
        (true, _) => Ok(Top::Dir),
        (false, false) => Ok(Top::File),
    }
}

/// The name a source goes under at the top of the archive: `.` for its contents, else its
/// base name (`None` when the path has none, like `..`: the caller resolves it).
pub fn top_name(path: &str, top: Top) -> Option<String> {
    if top == Top::Contents {
        return Some(".".into());
    }
    Path::new(path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
}

/// The top of an archive from its first entry: its path and whether it is a directory. An
/// archive of contents starts with `.` (or `./…`); one whose first entry lies below its top
/// has a directory at the top.
pub fn archive_top(first: &Path, is_dir: bool) -> Top {
    use std::path::Component;
    let mut parts = first.components();
    if matches!(parts.next(), None | Some(Component::CurDir)) {
        return Top::Contents;
    }
    match (parts.next().is_some(), is_dir) {
        (true, _) | (false, true) => Top::Dir,
        (false, false) => Top::File,
    }
}

/// Where an archive with `top` goes at `dest` (the path as given, so a trailing `/` counts),
/// given what is there and whether its parent directory exists.
pub fn place(
    top: Top,
    dest: &str,
    found: Dest,
    parent_exists: bool,
) -> Result<Placement, CopyError> {
    let wants_dir = dest.ends_with('/') || dest.ends_with("/.");
    match (top, found) {
        (Top::Contents, Dest::Dir) => Ok(Placement::ContentsInto),
        (_, Dest::Dir) => Ok(Placement::Into),
        (Top::File, Dest::File) if wants_dir => Err(CopyError::NotADirectory(dest.into())),
        (Top::File, Dest::File) => Ok(Placement::As),
        (_, Dest::File) => Err(CopyError::DirOntoFile(dest.into())),
        (_, Dest::Missing) if !parent_exists => Err(CopyError::MissingParent(
            parent(dest).unwrap_or_else(|| dest.to_string()),
        )),
        (Top::File, Dest::Missing) if wants_dir => Err(CopyError::NoSuchDirectory(dest.into())),
        (Top::File | Top::Dir, Dest::Missing) => Ok(Placement::As),
        (Top::Contents, Dest::Missing) => Ok(Placement::ContentsInto),
    }
}

/// The parent directory of a destination as given (`.` for a bare name).
pub fn parent(dest: &str) -> Option<String> {
    let trimmed = dest.trim_end_matches('/');
    let p = Path::new(if trimmed.is_empty() { dest } else { trimmed }).parent()?;
    Some(if p.as_os_str().is_empty() {
        ".".into()
    } else {
        p.display().to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_say_what_they_copy() {
        assert_eq!(source_top("/tmp/x", false), Ok(Top::File));
        assert_eq!(source_top("/tmp/d", true), Ok(Top::Dir));
        assert_eq!(source_top("/tmp/d/", true), Ok(Top::Dir));
        assert_eq!(source_top("/tmp/d/.", true), Ok(Top::Contents));
        assert_eq!(source_top(".", true), Ok(Top::Contents));
        assert!(matches!(
            source_top("/tmp/x/", false),
            Err(CopyError::NotADirectory(_))
        ));
        assert!(matches!(
            source_top("/tmp/x/.", false),
            Err(CopyError::NotADirectory(_))
        ));
        assert_eq!(top_name("/tmp/d/", Top::Dir).as_deref(), Some("d"));
        assert_eq!(top_name("/tmp/d/.", Top::Contents).as_deref(), Some("."));
        assert_eq!(archive_top(Path::new("./"), true), Top::Contents);
        assert_eq!(archive_top(Path::new("d/"), true), Top::Dir);
        assert_eq!(archive_top(Path::new("x"), false), Top::File);
        assert_eq!(archive_top(Path::new("d/a.txt"), false), Top::Dir);
        assert_eq!(archive_top(Path::new("./a.txt"), false), Top::Contents);
    }

    #[test]
    fn destinations_follow_cp() {
        use Placement::*;
        let ok = |top, dest: &str, found| place(top, dest, found, true);
        assert_eq!(ok(Top::File, "/new", Dest::Missing), Ok(As));
        assert_eq!(ok(Top::File, "/f", Dest::File), Ok(As));
        assert_eq!(ok(Top::File, "/d", Dest::Dir), Ok(Into));
        assert_eq!(ok(Top::File, "/d/", Dest::Dir), Ok(Into));
        assert_eq!(ok(Top::Dir, "/new", Dest::Missing), Ok(As));
        assert_eq!(ok(Top::Dir, "/new/", Dest::Missing), Ok(As));
        assert_eq!(ok(Top::Dir, "/d", Dest::Dir), Ok(Into));
        assert_eq!(ok(Top::Contents, "/d", Dest::Dir), Ok(ContentsInto));
        assert_eq!(ok(Top::Contents, "/new", Dest::Missing), Ok(ContentsInto));
        assert!(matches!(
            ok(Top::File, "/new/", Dest::Missing),
            Err(CopyError::NoSuchDirectory(_))
        ));
        assert!(matches!(
            ok(Top::File, "/f/", Dest::File),
            Err(CopyError::NotADirectory(_))
        ));
        assert!(matches!(
            ok(Top::Dir, "/f", Dest::File),
            Err(CopyError::DirOntoFile(_))
        ));
        assert_eq!(
            place(Top::File, "/no/such/x", Dest::Missing, false),
            Err(CopyError::MissingParent("/no/such".into()))
        );
        assert_eq!(
            place(Top::Dir, "work/back/", Dest::Missing, false),
            Err(CopyError::MissingParent("work".into()))
        );
    }
}
