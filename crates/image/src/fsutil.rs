//! Durable file updates: every state file is replaced atomically (write a temporary file beside
//! it, fsync, rename over, fsync the directory), so a crash leaves the old or the new content,
//! never a torn one.

use std::io::Write;
use std::path::Path;

/// Replaces `path` with `bytes` atomically and durably, with the given mode.
pub fn atomic_write(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("atomic_write needs a file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Serialises `value` as pretty JSON into `path` atomically, readable by its owner alone:
/// state files are the service's, and users see them only through its API.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    write_json_mode(path, value, 0o600)
}

/// [`write_json`] with the given mode.
pub fn write_json_mode<T: serde::Serialize>(
    path: &Path,
    value: &T,
    mode: u32,
) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    atomic_write(path, &bytes, mode)
}

/// Reads JSON from `path`; `Ok(None)` when the file does not exist.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> std::io::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether `name` is a temporary of [`atomic_write`]: `.<file>.tmp-<pid>`.
fn is_temporary(name: &str) -> bool {
    name.starts_with('.')
        && name
            .rsplit_once(".tmp-")
            .is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
}

/// Removes the temporaries of [`atomic_write`] that a killed process left in `dir` (not
/// recursively); how many. Call only while no other process writes there (under the
/// service's instance lock).
pub fn remove_stale_temporaries(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| is_temporary(&e.file_name().to_string_lossy()))
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter(|e| std::fs::remove_file(e.path()).is_ok())
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporaries_of_a_killed_writer_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        write_json(&dir.path().join("refs.json"), &vec![1]).unwrap();
        // What a writer killed between its write and its rename leaves.
        std::fs::write(dir.path().join(".refs.json.tmp-4242"), "{\"half").unwrap();
        for keep in [".hidden", "notes.tmp-1", ".x.tmp-", ".x.tmp-12a"] {
            std::fs::write(dir.path().join(keep), "").unwrap();
        }
        assert_eq!(remove_stale_temporaries(dir.path()), 1);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                ".hidden",
                ".x.tmp-",
                ".x.tmp-12a",
                "notes.tmp-1",
                "refs.json"
            ]
        );
        assert_eq!(
            read_json::<Vec<i32>>(&dir.path().join("refs.json")).unwrap(),
            Some(vec![1])
        );
    }

    #[test]
    fn replaces_content_and_leaves_no_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        write_json(&p, &vec![1, 2]).unwrap();
        write_json(&p, &vec![3]).unwrap();
        assert_eq!(read_json::<Vec<i32>>(&p).unwrap(), Some(vec![3]));
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
        assert_eq!(
            read_json::<Vec<i32>>(&dir.path().join("absent")).unwrap(),
            None
        );
    }
}
