//! The machine lifecycle: create, boot, start, stop, delete.

use std::path::{Path, PathBuf};
use std::time::Duration;

use container_api::machine::{
    CreateRequest, HomeMount, Machine, MachineState, MountSpec, StopRequest,
};
use container_api::ports::Publish;
use container_api::system::EventAction;
use container_api::{ApiError, ErrorKind};

use super::{guest_path, mac_for};
use crate::core::ports::{BootSpec, Namespace, Share};
use crate::core::{Caller, Core};
use crate::machines::{MachineRecord, name};

/// Default seconds a clean stop may take before the VM is forced off.
pub const DEFAULT_STOP_TIMEOUT: u64 = 30;
/// The longest a stop may wait for a clean shutdown (an hour): a longer wait is a mistake,
/// and a bounded one can never overflow a deadline.
pub const MAX_STOP_TIMEOUT: u64 = 3600;

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

impl Core {
    pub(in crate::core) async fn machine_create(
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
        // The image's part and the address are filled in once known.
        let mut record = MachineRecord {
            name: name.clone(),
            owner_uid: caller.uid,
            user,
            image: String::new(),
            image_digest: String::new(),
            stop_signal: None,
            created: chrono::Utc::now(),
            cpus: req.cpus.unwrap_or(defaults.cpus),
            memory: req.memory.unwrap_or(defaults.memory),
            disk_size: req.disk_size.unwrap_or(defaults.disk_size),
            home_mount: req.home_mount.unwrap_or(defaults.home_mount),
            mounts,
            network,
            kernel: req.kernel.clone().or_else(|| defaults.kernel.clone()),
            ip_address: None,
            mac: mac_for(&name),
            pending_restart: false,
            instance: Some(crate::runtime::disk::random_id()),
            autostart: req.autostart,
            forward_ports: true,
            publish: publish_list(&req.publish)?,
        };
        self.check_settings(&record)?;
        let _slot = self.check_machine_count(caller.uid, &name)?;
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
        // The caller's own name first, then a system-wide one: never another user's.
        let image = self
            .state
            .images
            .prepare(Namespace::User(caller.uid), &req.image)
            .await?;
        if !image.has_init {
            return Err(ApiError::invalid(format!(
                "image {} has no /sbin/init: a machine boots the image's own init (systemd, OpenRC, busybox); use an image that has one",
                image.reference
            )));
        }
        let _guard = self.state.locks.lock(&name).await;
        let dir = self.state.machines.reserve(&name)?;
        let disk = self.state.machines.disk_path(&name);
        let lease = match record.network.as_str() {
            "none" => None,
            _ => match self.state.net.lease(&name, caller.uid) {
                Ok(l) => Some(l),
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(e);
                }
            },
        };
        record.image = image.reference.clone();
        record.image_digest = image.digest.clone();
        record.stop_signal = image.stop_signal.clone();
        if let Some(l) = &lease {
            record.ip_address = Some(l.ip.clone());
            record.mac = l.mac.clone();
        }
        let created = async {
            self.state
                .vms
                .create_disk(&image.base_disk, &disk, record.disk_size)
                .await?;
            self.state.machines.save(&record)?;
            self.state.machines.seal(&name)?;
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
        self.emit(caller.uid, &name, EventAction::Created, None);
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

    /// Boots a stopped machine (no-op when its VM runs: booting, running, or unresponsive,
    /// where what needs its agent says what to do). The caller holds the machine's lock.
    pub(super) async fn boot(&self, record: &MachineRecord) -> Result<(), ApiError> {
        if self.state.vms.state(&record.name).is_up() {
            return Ok(());
        }
        let _booting = self.check_running_totals(record)?;
        // The first boot on a new host installs the recommended kernel rather than failing:
        // `system kernel set` stays for choosing another.
        if record.kernel.is_none()
            && self.state.config.kernel.binary.is_none()
            && self.state.platform.kernel().is_none()
        {
            self.state.platform.ensure_kernel().await?;
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
            let lease = self.state.net.lease(&record.name, record.owner_uid)?;
            if record.ip_address.as_deref() != Some(lease.ip.as_str()) || record.mac != lease.mac {
                record.ip_address = Some(lease.ip);
                record.mac = lease.mac;
                changed = true;
            }
        }
        if changed {
            self.state.machines.save(&record)?;
        }
        let (owner, name) = (record.owner_uid, record.name.clone());
        let ports = super::forwards::plan(&record);
        self.emit(owner, &name, EventAction::Booting, None);
        self.state
            .vms
            .boot(BootSpec {
                disk: self.state.machines.disk_path(&record.name),
                machine_dir: self.state.machines.machine_dir(&record.name),
                record,
                shares,
                home_shared,
            })
            .await?;
        self.state.vms.forward_ports(&name, ports);
        self.emit(owner, &name, EventAction::Running, None);
        Ok(())
    }

    pub(in crate::core) async fn machine_start(
        &self,
        caller: &Caller,
        name: &str,
    ) -> Result<Machine, ApiError> {
        let (_guard, record) = self.lock_visible(caller, name).await?;
        self.state.reboots.start_asked(name);
        self.boot(&record).await?;
        self.machine(&self.state.machines.get(name)?)
    }

    pub(in crate::core) async fn machine_stop(
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
        let timeout = req.timeout_secs.unwrap_or(DEFAULT_STOP_TIMEOUT);
        if timeout > MAX_STOP_TIMEOUT {
            return Err(ApiError::invalid(format!(
                "the stop timeout must be at most {MAX_STOP_TIMEOUT} s, got {timeout}"
            )));
        }
        // Before the lock: a reboot handled while this waits for it must see the stop.
        self.state.reboots.stop_asked(name);
        let (_guard, record) = self.lock_visible(caller, name).await?;
        let was_up = self.state.vms.state(name) != MachineState::Stopped;
        if was_up {
            self.emit(record.owner_uid, name, EventAction::Stopping, None);
        }
        self.state
            .vms
            .shutdown(name, signal, Duration::from_secs(timeout))
            .await?;
        if was_up {
            self.emit(record.owner_uid, name, EventAction::Stopped, None);
        }
        self.machine(&record)
    }

    pub(in crate::core) async fn machine_delete(
        &self,
        caller: &Caller,
        name: &str,
        force: bool,
    ) -> Result<Machine, ApiError> {
        let (_guard, record) = self.lock_visible(caller, name).await?;
        if self.state.vms.state(name) != MachineState::Stopped {
            if !force {
                return Err(ApiError::conflict(format!(
                    "machine `{name}` is running; stop it first or use `container machine rm -f {name}`"
                )));
            }
            self.emit(record.owner_uid, name, EventAction::Stopping, None);
            self.state
                .vms
                .shutdown(name, None, Duration::from_secs(10))
                .await?;
            self.emit(record.owner_uid, name, EventAction::Stopped, None);
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
        self.emit(record.owner_uid, name, EventAction::Deleted, None);
        // Its disk layers go unless a clone or another snapshot still reads them.
        self.collect_layers().await;
        Ok(machine)
    }
}

/// The ports to publish, each host port (number and protocol) once.
fn publish_list(publish: &[Publish]) -> Result<Vec<Publish>, ApiError> {
    let mut list = publish.to_vec();
    list.sort_by_key(|p| (p.host_port, p.protocol, p.guest_port));
    list.dedup();
    let same_host_port =
        |w: &&[Publish]| (w[0].host_port, w[0].protocol) == (w[1].host_port, w[1].protocol);
    if let Some(w) = list.windows(2).find(same_host_port) {
        return Err(ApiError::invalid(format!(
            "host port {}/{} is published twice (to {} and {}): publish each host port once",
            w[0].host_port, w[0].protocol, w[0].guest_port, w[1].guest_port
        )));
    }
    Ok(list)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
