//! Machine requests: create, list, inspect, set, default, start, stop, delete, and the
//! resolution of what `run` executes (user, working directory, environment). Every request
//! first resolves the name *as the caller*: another user's machine is "not found".

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use container_api::machine::{
    CreateRequest, HomeMount, Machine, MachineState, MountSpec, RunRequest, SetReply, StopRequest,
};
use container_api::size::parse_size;
use container_api::{ApiError, ErrorKind};

use super::ports::{BootSpec, ExecSpec, ExecUser, Reboot, Share};
use super::{Caller, Core};
use crate::machines::{MachineRecord, StoreError, name};

/// Smallest memory a machine may have.
const MIN_MEMORY: u64 = 256 << 20;
/// Most vCPUs a machine may have.
const MAX_CPUS: u32 = 64;
/// Default seconds a clean stop may take before the VM is forced off.
pub const DEFAULT_STOP_TIMEOUT: u64 = 30;

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match &e {
            StoreError::NotFound(_) => ApiError::not_found(e.to_string()),
            StoreError::Exists(_) => ApiError::new(ErrorKind::AlreadyExists, e.to_string()),
            StoreError::Io { .. } => ApiError::internal(format!("{e}: {}", source_text(&e))),
        }
    }
}

fn source_text(e: &dyn std::error::Error) -> String {
    e.source().map(|s| s.to_string()).unwrap_or_default()
}

/// Per-machine locks: lifecycle operations on one machine never interleave.
#[derive(Debug, Default)]
pub(super) struct Locks {
    inner: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Locks {
    pub(super) async fn lock(&self, name: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self
            .inner
            .lock()
            .expect("the lock table is never poisoned")
            .entry(name.to_string())
            .or_default()
            .clone();
        lock.lock_owned().await
    }
}

/// How many times a guest may reboot within [`REBOOT_WINDOW`] and be booted again each time.
pub(super) const REBOOT_LIMIT: usize = 5;
/// See [`REBOOT_LIMIT`].
pub(super) const REBOOT_WINDOW: Duration = Duration::from_secs(120);

/// Whether a machine whose guest rebooted is booted again. Not when a stop was asked for
/// after the VM ended (the stop found it stopped, and must not be undone), nor once it has
/// rebooted more than [`REBOOT_LIMIT`] times within [`REBOOT_WINDOW`] since it was last
/// started by request: a guest caught in a reboot loop is left stopped rather than spinning.
#[derive(Debug, Default)]
pub(super) struct RebootPolicy {
    inner: std::sync::Mutex<RebootHistory>,
}

#[derive(Debug, Default)]
struct RebootHistory {
    /// When a stop of each machine was last asked for.
    stops: HashMap<String, Instant>,
    /// Each machine's reboots since its last start by request, within the window.
    recent: HashMap<String, std::collections::VecDeque<Instant>>,
}

impl RebootPolicy {
    fn history(&self) -> std::sync::MutexGuard<'_, RebootHistory> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn stop_asked(&self, name: &str) {
        self.history()
            .stops
            .insert(name.to_string(), Instant::now());
    }

    pub(super) fn start_asked(&self, name: &str) {
        self.history().recent.remove(name);
    }

    pub(super) fn forget(&self, name: &str) {
        let mut h = self.history();
        h.stops.remove(name);
        h.recent.remove(name);
    }

    /// `Err` says why the machine stays stopped.
    pub(super) fn boot_again(&self, reboot: &Reboot) -> Result<(), String> {
        let mut h = self.history();
        if h.stops.get(&reboot.name).is_some_and(|t| *t >= reboot.at) {
            return Err("a stop was asked for after it went down".into());
        }
        let recent = h.recent.entry(reboot.name.clone()).or_default();
        recent.retain(|t| reboot.at.saturating_duration_since(*t) < REBOOT_WINDOW);
        recent.push_back(reboot.at);
        if recent.len() > REBOOT_LIMIT {
            return Err(format!(
                "it rebooted {} times within {} s; `container machine start {}` boots it again",
                recent.len(),
                REBOOT_WINDOW.as_secs(),
                reboot.name
            ));
        }
        Ok(())
    }
}

/// Parses a signal name or number: `TERM`, `SIGTERM`, `15`, `SIGRTMIN+3`.
pub fn parse_signal(text: &str) -> Result<i32, ApiError> {
    let t = text.trim().to_ascii_uppercase();
    let bare = t.strip_prefix("SIG").unwrap_or(&t);
    if let Ok(n) = bare.parse::<i32>() {
        if (1..=libc::SIGRTMAX()).contains(&n) {
            return Ok(n);
        }
    } else if let Some(rest) = bare.strip_prefix("RTMIN") {
        let offset = match rest.strip_prefix('+') {
            Some(n) => n.parse::<i32>().ok(),
            None if rest.is_empty() => Some(0),
            None => None,
        };
        if let Some(o) = offset
            && libc::SIGRTMIN() + o <= libc::SIGRTMAX()
        {
            return Ok(libc::SIGRTMIN() + o);
        }
    } else if let Ok(sig) = format!("SIG{bare}").parse::<nix::sys::signal::Signal>() {
        return Ok(sig as i32);
    }
    Err(ApiError::invalid(format!(
        "invalid signal `{text}`: use a name like TERM or SIGRTMIN+3, or a number"
    )))
}

/// Normalises a guest path: absolute, no `.`/`..`, not `/`.
fn guest_path(path: &str) -> Result<String, ApiError> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(ApiError::invalid(format!(
            "guest path `{path}` must be absolute"
        )));
    }
    let mut parts = Vec::new();
    for c in p.components() {
        match c {
            std::path::Component::Normal(s) => parts.push(s.to_string_lossy().to_string()),
            std::path::Component::RootDir | std::path::Component::CurDir => {}
            _ => {
                return Err(ApiError::invalid(format!(
                    "guest path `{path}` may not contain `..`"
                )));
            }
        }
    }
    if parts.is_empty() {
        return Err(ApiError::invalid(
            "cannot mount over the machine's root `/`",
        ));
    }
    Ok(format!("/{}", parts.join("/")))
}

/// A deterministic MAC for a machine name (locally administered, QEMU's prefix).
fn mac_for(name: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    name.hash(&mut h);
    let v = h.finish().to_be_bytes();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", v[0], v[1], v[2])
}

impl Core {
    /// The record of `name` if the caller may see it.
    pub(super) fn visible(&self, caller: &Caller, name: &str) -> Result<MachineRecord, ApiError> {
        let record = self.state.machines.get(name)?;
        if caller.is_root() || record.owner_uid == caller.uid {
            Ok(record)
        } else {
            Err(StoreError::NotFound(name.to_string()).into())
        }
    }

    pub(super) fn to_api(&self, record: &MachineRecord, default: Option<&str>) -> Machine {
        let vms = &self.state.vms;
        let disk = self.state.machines.disk_path(&record.name);
        Machine {
            name: record.name.clone(),
            image: record.image.clone(),
            image_digest: record.image_digest.clone(),
            created: record.created,
            started: vms.started(&record.name),
            state: vms.state(&record.name),
            default: default == Some(record.name.as_str()),
            ip_address: record.ip_address.clone(),
            cpus: record.cpus,
            memory: record.memory,
            disk_size: record.disk_size,
            disk_allocated: vms.disk_allocated(&disk),
            home_mount: record.home_mount,
            mounts: record.mounts.clone(),
            network: record.network.clone(),
            kernel: record.kernel.clone(),
            user: record.user.clone(),
            owner_uid: record.owner_uid,
            pending_restart: record.pending_restart,
        }
    }

    fn machine(&self, record: &MachineRecord) -> Result<Machine, ApiError> {
        let default = self.state.machines.default_for(record.owner_uid)?;
        Ok(self.to_api(record, default.as_deref()))
    }

    pub(super) fn machine_list(&self, caller: &Caller) -> Result<Vec<Machine>, ApiError> {
        let defaults = self.state.machines.defaults()?;
        Ok(self
            .state
            .machines
            .list()?
            .into_iter()
            .filter(|r| caller.is_root() || r.owner_uid == caller.uid)
            .map(|r| {
                let d = defaults.get(&r.owner_uid).cloned();
                self.to_api(&r, d.as_deref())
            })
            .collect())
    }

    pub(super) fn machine_get(&self, caller: &Caller, name: &str) -> Result<Machine, ApiError> {
        self.machine(&self.visible(caller, name)?)
    }

    pub(super) async fn machine_create(
        &self,
        caller: &Caller,
        req: CreateRequest,
    ) -> Result<Machine, ApiError> {
        let defaults = &self.state.config.machine;
        let name = match &req.name {
            Some(n) => {
                name::validate(n).map_err(ApiError::invalid)?;
                n.clone()
            }
            None => name::from_image(&req.image),
        };
        let cpus = req.cpus.unwrap_or(defaults.cpus);
        if cpus == 0 || cpus > MAX_CPUS {
            return Err(ApiError::invalid(format!(
                "cpus must be between 1 and {MAX_CPUS}, got {cpus}"
            )));
        }
        let memory = req.memory.unwrap_or(defaults.memory);
        if memory < MIN_MEMORY {
            return Err(ApiError::invalid(format!(
                "memory must be at least 256M, got {memory} bytes"
            )));
        }
        let disk_size = req.disk_size.unwrap_or(defaults.disk_size);
        let network = match req.network.as_deref() {
            None | Some("default") => "default".to_string(),
            Some("none") => "none".to_string(),
            Some(other) => {
                return Err(ApiError::invalid(format!(
                    "unknown network `{other}`: use `none`, or leave it out for the default network"
                )));
            }
        };
        let user = self.state.host.user(caller.uid)?;
        let mut mounts = Vec::new();
        for m in &req.mounts {
            if !self
                .state
                .host
                .can_read_dir(caller.uid, user.gid, &m.host_path)?
            {
                return Err(ApiError::new(
                    ErrorKind::PermissionDenied,
                    format!(
                        "cannot mount {}: it is not a directory you can read",
                        m.host_path
                    ),
                ));
            }
            mounts.push(MountSpec {
                host_path: m.host_path.clone(),
                guest_path: guest_path(&m.guest_path)?,
                read_only: m.read_only,
            });
        }
        let kernel = req.kernel.clone().or_else(|| defaults.kernel.clone());
        if let Some(k) = &kernel
            && !self.state.host.is_file(Path::new(k))
        {
            return Err(ApiError::invalid(format!("kernel {k} is not a file")));
        }
        if self.state.machines.get(&name).is_ok() {
            let hint = if req.name.is_none() {
                " (give another with -n/--name)"
            } else {
                ""
            };
            return Err(ApiError::new(
                ErrorKind::AlreadyExists,
                format!("a machine named `{name}` already exists{hint}"),
            ));
        }
        let image = self.state.images.prepare(&req.image).await?;
        if !image.has_init {
            return Err(ApiError::invalid(format!(
                "image {} has no /sbin/init: a machine boots the image's own init (systemd, OpenRC, busybox); use an image that has one",
                image.reference
            )));
        }
        let _guard = self.state.locks.lock(&name).await;
        let dir = self.state.machines.reserve(&name)?;
        let disk = self.state.machines.disk_path(&name);
        let lease = match network.as_str() {
            "none" => None,
            _ => match self.state.net.lease(&name) {
                Ok(l) => Some(l),
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(e);
                }
            },
        };
        let record = MachineRecord {
            name: name.clone(),
            owner_uid: caller.uid,
            user,
            image: image.reference.clone(),
            image_digest: image.digest.clone(),
            stop_signal: image.stop_signal.clone(),
            created: chrono::Utc::now(),
            cpus,
            memory,
            disk_size,
            home_mount: req.home_mount.unwrap_or(defaults.home_mount),
            mounts,
            network,
            kernel,
            ip_address: lease.as_ref().map(|l| l.ip.clone()),
            mac: lease
                .as_ref()
                .map(|l| l.mac.clone())
                .unwrap_or_else(|| mac_for(&name)),
            pending_restart: false,
        };
        let created = async {
            self.state
                .vms
                .create_disk(&image.base_disk, &disk, disk_size)
                .await?;
            self.state.machines.save(&record)?;
            Ok::<(), ApiError>(())
        }
        .await;
        if let Err(e) = created {
            let _ = std::fs::remove_dir_all(&dir);
            if lease.is_some()
                && let Err(release) = self.state.net.release(&name)
            {
                tracing::warn!(machine = %name, error = %release.message, "could not release the lease of a failed create");
            }
            return Err(e);
        }
        let first = self.state.machines.default_for(caller.uid)?.is_none();
        if req.set_default || first {
            self.state.machines.set_default(caller.uid, Some(&name))?;
        }
        if !req.no_boot {
            self.boot(&record).await.map_err(|e| {
                ApiError::new(
                    e.kind,
                    format!(
                        "machine `{name}` was created but did not boot: {}; see `container machine logs --boot {name}`",
                        e.message
                    ),
                )
            })?;
        }
        self.machine(&self.state.machines.get(&name)?)
    }

    /// Boots a stopped machine (no-op when running). The caller holds the machine's lock.
    async fn boot(&self, record: &MachineRecord) -> Result<(), ApiError> {
        if self.state.vms.state(&record.name) == MachineState::Running {
            return Ok(());
        }
        let mut shares = Vec::new();
        let home_shared = record.home_mount != HomeMount::None;
        if home_shared {
            let home = Path::new(&record.user.home);
            if !self.state.host.is_dir(home) {
                return Err(ApiError::invalid(format!(
                    "your home directory {} does not exist on the host; create it, or use `container machine set -n {} home-mount=none`",
                    home.display(),
                    record.name
                )));
            }
            shares.push(Share {
                tag: "home".into(),
                host_path: home.to_path_buf(),
                guest_path: record.user.home.clone(),
                read_only: record.home_mount == HomeMount::Ro,
            });
        }
        for (i, m) in record.mounts.iter().enumerate() {
            shares.push(Share {
                tag: format!("mount{i}"),
                host_path: PathBuf::from(&m.host_path),
                guest_path: m.guest_path.clone(),
                read_only: m.read_only,
            });
        }
        let mut record = record.clone();
        let mut changed = std::mem::take(&mut record.pending_restart);
        if record.network != "none" {
            // Machines made before they had leases (or whose lease was dropped because the
            // subnet changed) get one now; the address stays theirs from here on.
            let lease = self.state.net.lease(&record.name)?;
            if record.ip_address.as_deref() != Some(lease.ip.as_str()) || record.mac != lease.mac {
                record.ip_address = Some(lease.ip);
                record.mac = lease.mac;
                changed = true;
            }
        }
        if changed {
            self.state.machines.save(&record)?;
        }
        self.state
            .vms
            .boot(BootSpec {
                disk: self.state.machines.disk_path(&record.name),
                machine_dir: self.state.machines.machine_dir(&record.name),
                record,
                shares,
                home_shared,
            })
            .await
    }

    pub(super) async fn machine_start(
        &self,
        caller: &Caller,
        name: &str,
    ) -> Result<Machine, ApiError> {
        let record = self.visible(caller, name)?;
        let _guard = self.state.locks.lock(name).await;
        self.state.reboots.start_asked(name);
        self.boot(&record).await?;
        self.machine(&self.state.machines.get(name)?)
    }

    /// Boots machines again whose guest rebooted itself, as `sudo reboot` does on any
    /// machine: QEMU runs with `-no-reboot`, so a reboot inside ends the VM, and the runtime
    /// reports it. Runs until the runtime goes away.
    pub fn follow_reboots(&self) {
        let core = self.clone();
        let mut reboots = self.state.vms.reboots();
        tokio::spawn(async move {
            loop {
                match reboots.recv().await {
                    Ok(reboot) => core.boot_after_reboot(&reboot).await,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "missed reboots of machines; they stay stopped");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }

    async fn boot_after_reboot(&self, reboot: &Reboot) {
        let name = reboot.name.as_str();
        let _guard = self.state.locks.lock(name).await;
        // Removed, or started by someone else, while the guest went down.
        let Ok(record) = self.state.machines.get(name) else {
            return;
        };
        if self.state.vms.state(name) != MachineState::Stopped {
            return;
        }
        if let Err(why) = self.state.reboots.boot_again(reboot) {
            tracing::warn!(machine = name, "the guest rebooted; left stopped: {why}");
            return;
        }
        tracing::info!(machine = name, "the guest rebooted; booting it again");
        if let Err(e) = self.boot(&record).await {
            tracing::warn!(
                machine = name,
                "booting the machine again after its reboot failed: {}",
                e.message
            );
        }
    }

    pub(super) async fn machine_stop(
        &self,
        caller: &Caller,
        name: &str,
        req: StopRequest,
    ) -> Result<Machine, ApiError> {
        let record = self.visible(caller, name)?;
        let signal = match req.signal.as_deref().or(record.stop_signal.as_deref()) {
            // An explicit or image signal; otherwise the agent picks the init's own.
            Some(s) => Some(parse_signal(s)?),
            None => None,
        };
        let timeout = Duration::from_secs(req.timeout_secs.unwrap_or(DEFAULT_STOP_TIMEOUT));
        // Before the lock: a reboot handled while this waits for it must see the stop.
        self.state.reboots.stop_asked(name);
        let _guard = self.state.locks.lock(name).await;
        self.state.vms.shutdown(name, signal, timeout).await?;
        self.machine(&record)
    }

    pub(super) async fn machine_delete(
        &self,
        caller: &Caller,
        name: &str,
        force: bool,
    ) -> Result<Machine, ApiError> {
        let record = self.visible(caller, name)?;
        let _guard = self.state.locks.lock(name).await;
        if self.state.vms.state(name) != MachineState::Stopped {
            if !force {
                return Err(ApiError::conflict(format!(
                    "machine `{name}` is running; stop it first or use `container machine rm -f {name}`"
                )));
            }
            self.state
                .vms
                .shutdown(name, None, Duration::from_secs(10))
                .await?;
        }
        let machine = self.machine(&record)?;
        self.state.machines.remove(name)?;
        self.state.reboots.forget(name);
        if let Err(e) = self.state.net.release(name) {
            // The machine is gone; startup reconciliation frees what is left.
            tracing::warn!(machine = %name, error = %e.message, "could not release the machine's address");
        }
        if machine.default {
            self.state.machines.set_default(record.owner_uid, None)?;
        }
        Ok(machine)
    }

    pub(super) async fn machine_set_default(
        &self,
        caller: &Caller,
        name: &str,
    ) -> Result<Machine, ApiError> {
        let record = self.visible(caller, name)?;
        self.state
            .machines
            .set_default(record.owner_uid, Some(name))?;
        self.machine(&record)
    }

    pub(super) async fn machine_set(
        &self,
        caller: &Caller,
        name: &str,
        settings: Vec<(String, String)>,
    ) -> Result<SetReply, ApiError> {
        let record = self.visible(caller, name)?;
        if settings.is_empty() {
            return Err(ApiError::invalid("give at least one KEY=VALUE"));
        }
        let _guard = self.state.locks.lock(name).await;
        let mut new = record.clone();
        let mut grow_to = None;
        for (key, value) in &settings {
            match key.as_str() {
                "cpus" => {
                    let n: u32 = value.parse().map_err(|_| {
                        ApiError::invalid(format!("cpus must be a number, got `{value}`"))
                    })?;
                    if n == 0 || n > MAX_CPUS {
                        return Err(ApiError::invalid(format!(
                            "cpus must be between 1 and {MAX_CPUS}"
                        )));
                    }
                    new.cpus = n;
                }
                "memory" => {
                    let m = parse_size(value).map_err(ApiError::invalid)?;
                    if m < MIN_MEMORY {
                        return Err(ApiError::invalid("memory must be at least 256M"));
                    }
                    new.memory = m;
                }
                "disk-size" => {
                    let d = parse_size(value).map_err(ApiError::invalid)?;
                    if d < record.disk_size {
                        return Err(ApiError::invalid(format!(
                            "disk-size can only grow (now {}); shrinking would lose data",
                            container_api::size::format_size(record.disk_size)
                        )));
                    }
                    new.disk_size = d;
                    grow_to = Some(d);
                }
                "home-mount" => {
                    new.home_mount = value.parse().map_err(ApiError::invalid)?;
                }
                "kernel" => {
                    new.kernel = if value.is_empty() {
                        None
                    } else if self.state.host.is_file(Path::new(value)) {
                        Some(value.clone())
                    } else {
                        return Err(ApiError::invalid(format!("kernel {value} is not a file")));
                    };
                }
                other => {
                    return Err(ApiError::invalid(format!(
                        "unknown setting `{other}`: valid keys are cpus, memory, disk-size, home-mount, kernel"
                    )));
                }
            }
        }
        let running = self.state.vms.state(name) != MachineState::Stopped;
        if let Some(size) = grow_to
            && size > record.disk_size
            && !running
        {
            let disk = self.state.machines.disk_path(name);
            self.state.vms.grow_disk(&disk, size).await?;
        } else if grow_to.is_some_and(|s| s > record.disk_size) && running {
            // The disk grows at the next start; remember the old size until then.
            new.disk_size = record.disk_size;
            return Err(ApiError::conflict(format!(
                "disk-size can only change while `{name}` is stopped; run `container machine stop {name}` first"
            )));
        }
        new.pending_restart = running && new != record;
        self.state.machines.save(&new)?;
        Ok(SetReply {
            takes_effect_at_next_start: running,
            machine: self.machine(&new)?,
        })
    }

    /// Works out what `run` starts: user, working directory, environment, argv.
    pub(super) fn exec_spec(
        record: &MachineRecord,
        req: &RunRequest,
    ) -> Result<ExecSpec, ApiError> {
        let user = &record.user;
        let exec_user = if req.root {
            ExecUser::Ids {
                uid: 0,
                gid: Some(0),
            }
        } else if let Some(u) = &req.user {
            let (who, group) = match u.split_once(':') {
                Some((w, g)) => (w, Some(g)),
                None => (u.as_str(), None),
            };
            let gid = group
                .map(|g| {
                    g.parse::<u32>()
                        .map_err(|_| ApiError::invalid(format!("invalid group `{g}` in -u {u}")))
                })
                .transpose()?
                .or(req.gid);
            match who.parse::<u32>() {
                Ok(uid) => ExecUser::Ids { uid, gid },
                Err(_) => ExecUser::Name(who.to_string()),
            }
        } else if let Some(uid) = req.uid {
            ExecUser::Ids { uid, gid: req.gid }
        } else {
            ExecUser::Ids {
                uid: user.uid,
                gid: Some(req.gid.unwrap_or(user.gid)),
            }
        };
        let as_machine_user = matches!(&exec_user, ExecUser::Ids { uid, .. } if *uid == user.uid)
            || matches!(&exec_user, ExecUser::Name(n) if *n == user.name);
        let home = if as_machine_user {
            user.home.clone()
        } else if matches!(exec_user, ExecUser::Ids { uid: 0, .. }) {
            "/root".to_string()
        } else {
            "/".to_string()
        };
        let cwd = match &req.workdir {
            Some(w) => guest_path(w).or_else(|_| {
                if w == "/" {
                    Ok("/".to_string())
                } else {
                    Err(ApiError::invalid(format!(
                        "workdir `{w}` must be an absolute path"
                    )))
                }
            })?,
            None => req
                .caller_cwd
                .as_deref()
                .and_then(|cwd| visible_path(record, cwd))
                .unwrap_or_else(|| home.clone()),
        };
        let shell = user.shell.clone();
        let (argv, arg0) = if req.command.is_empty() {
            let base = Path::new(&shell)
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_else(|| "sh".into());
            (vec![shell.clone()], Some(format!("-{base}")))
        } else {
            (req.command.clone(), None)
        };
        let mut env = vec![
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
            format!("HOME={home}"),
        ];
        if as_machine_user {
            env.push(format!("USER={}", user.name));
            env.push(format!("LOGNAME={}", user.name));
            env.push(format!("SHELL={shell}"));
        }
        if req.tty {
            env.push("TERM=xterm-256color".into());
        }
        // User-given values override the defaults above.
        for e in &req.env {
            let key = e.split('=').next().unwrap_or_default();
            env.retain(|d| d.split('=').next() != Some(key));
            env.push(e.clone());
        }
        Ok(ExecSpec {
            argv,
            arg0,
            env,
            cwd,
            user: exec_user,
            tty: req.tty,
            rows: req.rows.unwrap_or(24),
            cols: req.cols.unwrap_or(80),
            detach: req.detach,
        })
    }
}

/// The guest path at which the machine sees host path `cwd`, if it does: inside the shared
/// home (same path) or inside another mount (mapped to its guest path).
fn visible_path(record: &MachineRecord, cwd: &str) -> Option<String> {
    let cwd = Path::new(cwd);
    if record.home_mount != HomeMount::None && cwd.starts_with(&record.user.home) {
        return Some(cwd.display().to_string());
    }
    record.mounts.iter().find_map(|m| {
        cwd.strip_prefix(&m.host_path).ok().map(|rest| {
            if rest.as_os_str().is_empty() {
                m.guest_path.clone()
            } else {
                format!("{}/{}", m.guest_path, rest.display())
            }
        })
    })
}

impl Core {
    /// Boots the machine if needed and runs the process, relaying frames to `client`.
    pub(super) async fn machine_exec(
        &self,
        caller: &Caller,
        name: &str,
        req: RunRequest,
        client: Box<dyn super::ports::ClientStream>,
    ) -> Result<(), ApiError> {
        let mut client = client;
        let prepared = async {
            let record = self.visible(caller, name)?;
            let spec = Self::exec_spec(&record, &req)?;
            let _guard = self.state.locks.lock(name).await;
            self.boot(&record).await?;
            Ok::<_, ApiError>(spec)
        }
        .await;
        match prepared {
            Ok(spec) => self.state.vms.exec(name, spec, client).await,
            Err(e) => {
                // The connection is already upgraded: the error travels as a frame.
                let _ = container_api::session::Frame::Error(e.clone())
                    .write(&mut client)
                    .await;
                Err(e)
            }
        }
    }

    /// Copies a tar stream into a running (or booted on demand) machine.
    pub(super) async fn machine_copy_in(
        &self,
        caller: &Caller,
        name: &str,
        path: &str,
        tar: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    ) -> Result<(), ApiError> {
        let record = self.visible(caller, name)?;
        let path =
            guest_path(path).or_else(|e| if path == "/" { Ok("/".into()) } else { Err(e) })?;
        {
            let _guard = self.state.locks.lock(name).await;
            self.boot(&record).await?;
        }
        self.state.vms.copy_in(name, &path, tar).await
    }

    /// A tar stream of a path in the machine.
    pub(super) async fn machine_copy_out(
        &self,
        caller: &Caller,
        name: &str,
        path: &str,
    ) -> Result<Box<dyn tokio::io::AsyncRead + Send + Unpin>, ApiError> {
        let record = self.visible(caller, name)?;
        let path =
            guest_path(path).or_else(|e| if path == "/" { Ok("/".into()) } else { Err(e) })?;
        {
            let _guard = self.state.locks.lock(name).await;
            self.boot(&record).await?;
        }
        self.state.vms.copy_out(name, &path).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use container_api::machine::MachineUser;

    fn record(home_mount: HomeMount) -> MachineRecord {
        MachineRecord {
            name: "dev".into(),
            owner_uid: 1000,
            user: MachineUser {
                name: "alice".into(),
                uid: 1000,
                gid: 1000,
                home: "/home/alice".into(),
                shell: "/bin/bash".into(),
            },
            image: "i".into(),
            image_digest: "sha256:0".into(),
            stop_signal: None,
            created: chrono::Utc::now(),
            cpus: 1,
            memory: 1 << 30,
            disk_size: 1 << 30,
            home_mount,
            mounts: vec![MountSpec {
                host_path: "/srv/data".into(),
                guest_path: "/data".into(),
                read_only: true,
            }],
            network: "default".into(),
            kernel: None,
            ip_address: None,
            mac: mac_for("dev"),
            pending_restart: false,
        }
    }

    fn run(cmd: &[&str], cwd: &str) -> RunRequest {
        RunRequest {
            command: cmd.iter().map(|s| s.to_string()).collect(),
            caller_cwd: Some(cwd.into()),
            ..Default::default()
        }
    }

    #[test]
    fn run_lands_in_the_callers_directory_when_visible() {
        let r = record(HomeMount::Rw);
        assert_eq!(
            Core::exec_spec(&r, &run(&["pwd"], "/home/alice/src/x"))
                .unwrap()
                .cwd,
            "/home/alice/src/x"
        );
        assert_eq!(
            Core::exec_spec(&r, &run(&["pwd"], "/srv/data/a"))
                .unwrap()
                .cwd,
            "/data/a"
        );
        assert_eq!(
            Core::exec_spec(&r, &run(&["pwd"], "/srv/data"))
                .unwrap()
                .cwd,
            "/data"
        );
        assert_eq!(
            Core::exec_spec(&r, &run(&["pwd"], "/opt")).unwrap().cwd,
            "/home/alice"
        );
        // With no home share, the host home is not visible: start in the guest home.
        let none = record(HomeMount::None);
        assert_eq!(
            Core::exec_spec(&none, &run(&["pwd"], "/home/alice/src"))
                .unwrap()
                .cwd,
            "/home/alice"
        );
        let mut w = run(&["pwd"], "/home/alice");
        w.workdir = Some("/tmp".into());
        assert_eq!(Core::exec_spec(&r, &w).unwrap().cwd, "/tmp");
        w.workdir = Some("relative".into());
        assert!(Core::exec_spec(&r, &w).is_err());
    }

    #[test]
    fn no_command_means_a_login_shell_as_the_user() {
        let spec = Core::exec_spec(&record(HomeMount::Rw), &run(&[], "/")).unwrap();
        assert_eq!(spec.argv, ["/bin/bash"]);
        assert_eq!(spec.arg0.as_deref(), Some("-bash"));
        assert_eq!(
            spec.user,
            ExecUser::Ids {
                uid: 1000,
                gid: Some(1000)
            }
        );
        assert!(spec.env.contains(&"USER=alice".to_string()));
        assert!(spec.env.contains(&"HOME=/home/alice".to_string()));
    }

    #[test]
    fn users_and_env_follow_the_flags() {
        let r = record(HomeMount::Rw);
        let mut req = run(&["id"], "/");
        req.root = true;
        let spec = Core::exec_spec(&r, &req).unwrap();
        assert_eq!(
            spec.user,
            ExecUser::Ids {
                uid: 0,
                gid: Some(0)
            }
        );
        assert!(spec.env.contains(&"HOME=/root".to_string()));
        req.root = false;
        req.user = Some("postgres".into());
        assert_eq!(
            Core::exec_spec(&r, &req).unwrap().user,
            ExecUser::Name("postgres".into())
        );
        req.user = Some("33:44".into());
        assert_eq!(
            Core::exec_spec(&r, &req).unwrap().user,
            ExecUser::Ids {
                uid: 33,
                gid: Some(44)
            }
        );
        req.user = Some("33:x".into());
        assert!(Core::exec_spec(&r, &req).is_err());
        req.user = None;
        req.env = vec!["HOME=/elsewhere".into(), "A=1".into()];
        let env = Core::exec_spec(&r, &req).unwrap().env;
        assert!(env.contains(&"HOME=/elsewhere".to_string()));
        assert!(!env.contains(&"HOME=/home/alice".to_string()));
        assert!(env.contains(&"A=1".to_string()));
    }

    #[test]
    fn signals_parse_by_name_and_number() {
        assert_eq!(parse_signal("TERM").unwrap(), libc::SIGTERM);
        assert_eq!(parse_signal("SIGKILL").unwrap(), libc::SIGKILL);
        assert_eq!(parse_signal("15").unwrap(), 15);
        assert_eq!(parse_signal("SIGRTMIN+3").unwrap(), libc::SIGRTMIN() + 3);
        assert_eq!(parse_signal("rtmin+4").unwrap(), libc::SIGRTMIN() + 4);
        assert!(parse_signal("SIGNOPE").is_err());
        assert!(parse_signal("0").is_err());
        assert!(parse_signal("RTMIN+999").is_err());
    }

    #[test]
    fn guest_paths_are_normalised_and_checked() {
        assert_eq!(guest_path("/data/./x/").unwrap(), "/data/x");
        assert!(guest_path("data").is_err());
        assert!(guest_path("/a/../b").is_err());
        assert!(guest_path("/").is_err());
    }
}
