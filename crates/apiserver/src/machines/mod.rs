//! The machine store: one directory per machine under `<root>/machines/<name>/` holding its
//! record (`machine.json`) and its disk (`disk.qcow2`), plus `<root>/machines/defaults.json`
//! with each user's default machine. Records are replaced atomically; a directory without a
//! record is debris from a crashed create and is removed at open.

pub mod name;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use container_api::machine::{HomeMount, MachineUser, MountSpec};
use serde::{Deserialize, Serialize};

use crate::fsutil;

/// What is persisted about a machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineRecord {
    pub name: String,
    pub owner_uid: u32,
    pub user: MachineUser,
    pub image: String,
    pub image_digest: String,
    /// The image's STOPSIGNAL, used when `stop` names none.
    pub stop_signal: Option<String>,
    pub created: chrono::DateTime<chrono::Utc>,
    pub cpus: u32,
    pub memory: u64,
    pub disk_size: u64,
    pub home_mount: HomeMount,
    pub mounts: Vec<MountSpec>,
    /// `default` or `none`.
    pub network: String,
    pub kernel: Option<String>,
    /// The sticky address leased at create, when networked.
    pub ip_address: Option<String>,
    pub mac: String,
    /// Settings changed while running; cleared at the next start.
    #[serde(default)]
    pub pending_restart: bool,
    /// This machine's identity inside the guest (32 hex digits): new at create and at clone,
    /// kept across rename. A guest that finds another identity on its disk was copied, and
    /// takes a new machine-id and redoes the user setup. Absent in records from before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// Booted when the service starts, and again after its VM died unexpectedly.
    #[serde(default)]
    pub autostart: bool,
    /// The guest's listening ports are forwarded to the host (on unless turned off).
    #[serde(default = "on")]
    pub forward_ports: bool,
    /// Host ports forwarded to guest ports whatever the guest listens on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<container_api::ports::Publish>,
}

fn on() -> bool {
    true
}

/// A snapshot of a machine's disk: a shared layer (`runtime::disk`) frozen at `created`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRecord {
    pub name: String,
    pub layer: PathBuf,
    pub created: chrono::DateTime<chrono::Utc>,
}

/// Errors of the machine store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("machine `{0}` not found")]
    NotFound(String),
    #[error("a machine named `{0}` already exists")]
    Exists(String),
    #[error("machine store I/O on {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The machine directories.
#[derive(Debug)]
pub struct MachineStore {
    dir: PathBuf,
    /// Serialises the read-modify-write of `defaults.json`.
    defaults: std::sync::Mutex<()>,
}

/// Machine directories are root's alone: disks, records and logs of one user's machine are
/// no other user's business (they reach their own through the API).
const PRIVATE_DIR: u32 = 0o700;
const PRIVATE_FILE: u32 = 0o600;

/// Makes `dir` and every file directly in it private (see [`PRIVATE_DIR`]); for stores made
/// before machines were private, and for files helpers create with their own modes.
fn make_private(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(PRIVATE_DIR))?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        let mode = if meta.is_dir() {
            PRIVATE_DIR
        } else if meta.is_file() {
            PRIVATE_FILE
        } else {
            continue;
        };
        if meta.permissions().mode() & 0o7777 != mode {
            std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(mode))?;
        }
    }
    Ok(())
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl MachineStore {
    /// Opens `<root>/machines`, removing debris of interrupted creates.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        let dir = root.join("machines");
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        make_private(&dir).map_err(io(&dir))?;
        for entry in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let entry = entry.map_err(io(&dir))?;
            let path = entry.path();
            if path.is_dir() && !path.join("machine.json").exists() {
                tracing::warn!(path = %path.display(), "removing an incomplete machine directory");
                let _ = std::fs::remove_dir_all(&path);
            } else if path.is_dir() {
                make_private(&path).map_err(io(&path))?;
            }
        }
        Ok(Self {
            dir,
            defaults: Default::default(),
        })
    }

    pub fn machine_dir(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn disk_path(&self, name: &str) -> PathBuf {
        self.machine_dir(name).join("disk.qcow2")
    }

    fn snapshots_path(&self, name: &str) -> PathBuf {
        self.machine_dir(name).join("snapshots.json")
    }

    /// The machine's snapshots, oldest first.
    pub fn snapshots(&self, name: &str) -> Result<Vec<SnapshotRecord>, StoreError> {
        let path = self.snapshots_path(name);
        Ok(fsutil::read_json(&path)
            .map_err(io(&path))?
            .unwrap_or_default())
    }

    /// Replaces the machine's snapshot list (atomically).
    pub fn save_snapshots(
        &self,
        name: &str,
        snapshots: &[SnapshotRecord],
    ) -> Result<(), StoreError> {
        let path = self.snapshots_path(name);
        fsutil::write_json(&path, &snapshots).map_err(io(&path))
    }

    /// Moves a stopped machine's directory to a new name; the record is then saved under it
    /// by the caller. Fails if the new name is taken.
    pub fn rename(&self, old: &str, new: &str) -> Result<(), StoreError> {
        let (from, to) = (self.machine_dir(old), self.machine_dir(new));
        // renameat2(RENAME_NOREPLACE) would close the window; the per-machine locks of both
        // names, held by the caller, already do for the service's own requests.
        if to.exists() {
            return Err(StoreError::Exists(new.to_string()));
        }
        std::fs::rename(&from, &to).map_err(io(&from))?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.machine_dir(name).join("machine.json")
    }

    /// All records, sorted by name.
    pub fn list(&self) -> Result<Vec<MachineRecord>, StoreError> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let entry = entry.map_err(io(&self.dir))?;
            if !entry.path().is_dir() {
                continue;
            }
            let name = entry.file_name().to_string_lossy().to_string();
            match self.get(&name) {
                Ok(r) => out.push(r),
                Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    pub fn get(&self, name: &str) -> Result<MachineRecord, StoreError> {
        if name::validate(name).is_err() {
            return Err(StoreError::NotFound(name.to_string()));
        }
        let path = self.record_path(name);
        let mut record: MachineRecord = fsutil::read_json(&path)
            .map_err(io(&path))?
            .ok_or_else(|| StoreError::NotFound(name.to_string()))?;
        // The directory's name is the machine's: a rename moves the directory first and
        // saves the record after, so a crash in between leaves the record's copy stale.
        if record.name != name {
            record.name = name.to_string();
        }
        Ok(record)
    }

    /// Creates the machine directory; fails if the name is taken. The record is written last,
    /// by [`MachineStore::save`], so a crash in between leaves debris `open` removes.
    pub fn reserve(&self, name: &str) -> Result<PathBuf, StoreError> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = self.machine_dir(name);
        match std::fs::DirBuilder::new().mode(PRIVATE_DIR).create(&dir) {
            Ok(()) => Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(StoreError::Exists(name.to_string()))
            }
            Err(e) => Err(io(&dir)(e)),
        }
    }

    pub fn save(&self, record: &MachineRecord) -> Result<(), StoreError> {
        let path = self.record_path(&record.name);
        fsutil::write_json(&path, record).map_err(io(&path))
    }

    /// Makes every file in the machine's directory private again, after something other
    /// than the store (`qemu-img`, the VMM) created files there with modes of its own.
    pub fn seal(&self, name: &str) -> Result<(), StoreError> {
        let dir = self.machine_dir(name);
        make_private(&dir).map_err(io(&dir))
    }

    /// Removes a machine's directory and everything in it.
    pub fn remove(&self, name: &str) -> Result<(), StoreError> {
        let dir = self.machine_dir(name);
        // Drop the record first: a crash mid-way leaves debris, not a half machine.
        let record = self.record_path(name);
        std::fs::remove_file(&record).map_err(io(&record))?;
        std::fs::remove_dir_all(&dir).map_err(io(&dir))
    }

    fn defaults_path(&self) -> PathBuf {
        self.dir.join("defaults.json")
    }

    /// Each owner's default machine. A name whose machine is gone (an `rm` cut off before
    /// it cleared the default) is no default.
    pub fn defaults(&self) -> Result<BTreeMap<u32, String>, StoreError> {
        let path = self.defaults_path();
        let mut all: BTreeMap<u32, String> = fsutil::read_json(&path)
            .map_err(io(&path))?
            .unwrap_or_default();
        all.retain(|_, name| self.record_path(name).is_file());
        Ok(all)
    }

    pub fn default_for(&self, uid: u32) -> Result<Option<String>, StoreError> {
        Ok(self.defaults()?.remove(&uid))
    }

    pub fn set_default(&self, uid: u32, name: Option<&str>) -> Result<(), StoreError> {
        let _one_at_a_time = self.defaults.lock().unwrap_or_else(|p| p.into_inner());
        let mut all = self.defaults()?;
        match name {
            Some(n) => all.insert(uid, n.to_string()),
            None => all.remove(&uid),
        };
        let path = self.defaults_path();
        fsutil::write_json(&path, &all).map_err(io(&path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str) -> MachineRecord {
        MachineRecord {
            name: name.into(),
            owner_uid: 1000,
            user: MachineUser {
                name: "alice".into(),
                uid: 1000,
                gid: 1000,
                home: "/home/alice".into(),
                shell: "/bin/bash".into(),
            },
            image: "debian:12".into(),
            image_digest: "sha256:00".into(),
            stop_signal: None,
            created: chrono::Utc::now(),
            cpus: 1,
            memory: 1 << 30,
            disk_size: 64 << 30,
            home_mount: HomeMount::Rw,
            mounts: vec![],
            network: "default".into(),
            kernel: None,
            ip_address: None,
            mac: "52:54:00:00:00:01".into(),
            pending_restart: false,
            instance: None,
            autostart: false,
            forward_ports: true,
            publish: vec![],
        }
    }

    #[test]
    fn create_list_remove_and_defaults() {
        let root = tempfile::tempdir().unwrap();
        let store = MachineStore::open(root.path()).unwrap();
        store.reserve("dev").unwrap();
        store.save(&record("dev")).unwrap();
        assert!(matches!(store.reserve("dev"), Err(StoreError::Exists(_))));
        store.reserve("db").unwrap();
        store.save(&record("db")).unwrap();
        let names: Vec<_> = store.list().unwrap().into_iter().map(|r| r.name).collect();
        assert_eq!(names, ["db", "dev"]);
        store.set_default(1000, Some("dev")).unwrap();
        assert_eq!(store.default_for(1000).unwrap().as_deref(), Some("dev"));
        assert_eq!(store.default_for(0).unwrap(), None);
        store.remove("dev").unwrap();
        assert!(matches!(store.get("dev"), Err(StoreError::NotFound(_))));
        assert!(matches!(store.get("../etc"), Err(StoreError::NotFound(_))));
    }

    #[test]
    fn the_default_of_a_machine_removed_by_a_cut_off_rm_is_no_default() {
        let root = tempfile::tempdir().unwrap();
        let store = MachineStore::open(root.path()).unwrap();
        store.reserve("dev").unwrap();
        store.save(&record("dev")).unwrap();
        store.set_default(1000, Some("dev")).unwrap();
        assert_eq!(store.default_for(1000).unwrap().as_deref(), Some("dev"));
        // The rm removed the machine, and the service died before it cleared the default.
        store.remove("dev").unwrap();
        assert_eq!(store.default_for(1000).unwrap(), None);
        assert!(store.defaults().unwrap().is_empty());
    }

    #[test]
    fn debris_of_an_interrupted_create_is_removed() {
        let root = tempfile::tempdir().unwrap();
        let store = MachineStore::open(root.path()).unwrap();
        store.reserve("half").unwrap();
        drop(store);
        let store = MachineStore::open(root.path()).unwrap();
        assert!(!store.machine_dir("half").exists());
        store.reserve("half").unwrap();
    }

    #[test]
    fn machine_directories_and_files_are_private_whatever_was_there() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let root = tempfile::tempdir().unwrap();
        // A store of an older service: world-readable directories, records and disks.
        let old = root.path().join("machines/old");
        std::fs::create_dir_all(&old).unwrap();
        for (path, m) in [(root.path().join("machines"), 0o755), (old.clone(), 0o755)] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(m)).unwrap();
        }
        for file in ["machine.json", "disk.qcow2", "console.log"] {
            std::fs::write(old.join(file), "{}").unwrap();
            std::fs::set_permissions(old.join(file), std::fs::Permissions::from_mode(0o644))
                .unwrap();
        }
        let store = MachineStore::open(root.path()).unwrap();
        assert_eq!(mode(&root.path().join("machines")), 0o700);
        assert_eq!(mode(&old), 0o700);
        for file in ["machine.json", "disk.qcow2", "console.log"] {
            assert_eq!(mode(&old.join(file)), 0o600, "{file}");
        }
        // New machines are private from the start, and so is what others write there.
        let dir = store.reserve("dev").unwrap();
        assert_eq!(mode(&dir), 0o700);
        store.save(&record("dev")).unwrap();
        assert_eq!(mode(&dir.join("machine.json")), 0o600);
        std::fs::write(dir.join("disk.qcow2"), "x").unwrap();
        std::fs::set_permissions(
            dir.join("disk.qcow2"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        store.seal("dev").unwrap();
        assert_eq!(mode(&dir.join("disk.qcow2")), 0o600);
        store.set_default(1000, Some("dev")).unwrap();
        assert_eq!(mode(&root.path().join("machines/defaults.json")), 0o600);
    }
}
