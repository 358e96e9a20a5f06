//! Machine API types: create options, the machine record `ls`/`inspect` show, and the bodies of
//! `set`, `stop` and `run`.

use serde::{Deserialize, Serialize};

/// How the caller's home directory is shared with a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum HomeMount {
    #[default]
    Rw,
    Ro,
    None,
}

impl std::str::FromStr for HomeMount {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "rw" => Ok(Self::Rw),
            "ro" => Ok(Self::Ro),
            "none" => Ok(Self::None),
            other => Err(format!(
                "invalid home mount `{other}`: expected rw, ro or none"
            )),
        }
    }
}

impl std::fmt::Display for HomeMount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Rw => "rw",
            Self::Ro => "ro",
            Self::None => "none",
        })
    }
}

/// An extra host directory shared into the machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountSpec {
    pub host_path: String,
    pub guest_path: String,
    #[serde(default)]
    pub read_only: bool,
}

/// `POST /v1/machines` body. Absent values take the service's `[machine]` defaults.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    pub image: String,
    pub name: Option<String>,
    #[serde(default)]
    pub set_default: bool,
    #[serde(default)]
    pub no_boot: bool,
    pub cpus: Option<u32>,
    pub memory: Option<u64>,
    pub disk_size: Option<u64>,
    pub home_mount: Option<HomeMount>,
    #[serde(default)]
    pub mounts: Vec<MountSpec>,
    /// `none` disables networking; absent means the default network.
    pub network: Option<String>,
    pub kernel: Option<String>,
    /// Boot it when the service starts, and again if its VM dies unexpectedly. Left out of
    /// the JSON when false, so a newer CLI still talks to an older service.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub autostart: bool,
    /// Host ports forwarded to guest ports whether the guest listens yet or not. Left out
    /// of the JSON when empty, so a newer CLI still talks to an older service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<crate::ports::Publish>,
}

/// Lifecycle state of a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MachineState {
    Stopped,
    Starting,
    Running,
    Stopping,
    /// Running, but its agent missed its health checks: nothing can run in it until it is
    /// forced off (`machine stop -f`) and started again, unless it recovers.
    Unresponsive,
    /// Running, and commands run, but the image's init has not finished booting (systemd
    /// not yet `running`/`degraded`, OpenRC short of its default runlevel). The service's
    /// own view: machines show it as `running` with `booting` set ([`MachineState::shown`]).
    Booting,
}

impl MachineState {
    /// The status users see, and whether the machine is still booting: `booting` shows as
    /// `running`, Apple's value for a machine that runs commands.
    pub fn shown(self) -> (MachineState, bool) {
        match self {
            Self::Booting => (Self::Running, true),
            s => (s, false),
        }
    }

    /// Its VM runs: booting, running or unresponsive.
    pub fn is_up(self) -> bool {
        matches!(self, Self::Running | Self::Booting | Self::Unresponsive)
    }
}

impl std::fmt::Display for MachineState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Stopped => "stopped",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Stopping => "stopping",
            Self::Unresponsive => "unresponsive",
            Self::Booting => "booting",
        })
    }
}

/// The user a machine logs in as: the host user who created it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
    pub shell: String,
}

/// A machine as `ls` and `inspect` show it, in the schema of Apple's `container machine`
/// (camelCase keys, `id`, `status`, `image.reference`, `platform.os`, `userSetup`, dates in
/// ISO 8601 to the second), so scripts written for it read ours; the fields Apple's lacks
/// follow the same style. Absent values are left out rather than `null`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Machine {
    /// The machine's name.
    pub id: String,
    pub status: MachineState,
    /// The caller's default machine.
    pub default: bool,
    /// The address the machine answers on, while it runs (absent when stopped, as in Apple's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_address: Option<String>,
    /// The address kept for the machine across stops and restarts, also while stopped;
    /// absent without a network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserved_ip_address: Option<String>,
    /// The name the host (and the owner's other machines) resolve to the reserved address:
    /// `NAME.machine` (the service's `[network] domain`); absent without a network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_name: Option<String>,
    pub cpus: u32,
    /// Bytes.
    pub memory: u64,
    /// Virtual size of the machine disk, bytes.
    pub disk_size: u64,
    /// Bytes the machine disk occupies on the host (allocated, not apparent).
    pub disk_allocated: u64,
    pub home_mount: HomeMount,
    #[serde(with = "iso8601")]
    pub created_date: chrono::DateTime<chrono::Utc>,
    /// When the running VM started; absent when stopped.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "iso8601_opt")]
    pub started_date: Option<chrono::DateTime<chrono::Utc>>,
    pub image: MachineImage,
    pub platform: Platform,
    pub user_setup: UserSetup,
    pub mounts: Vec<MachineMount>,
    pub network: String,
    /// A kernel of the user's instead of the service's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// The host uid that owns the machine.
    pub owner_uid: u32,
    /// Settings changed with `set` that wait for the next start.
    #[serde(default)]
    pub pending_restart: bool,
    /// Booted when the service starts and after its VM died unexpectedly.
    #[serde(default)]
    pub autostart: bool,
    /// The guest's listening TCP ports and served UDP ports are forwarded to the host's
    /// loopback (`set forward-ports=on|off`).
    #[serde(default = "forward_ports_default")]
    pub forward_ports: bool,
    /// Host ports published at create (`--publish HOST:GUEST`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<crate::ports::Publish>,
    /// The ports forwarded now, while it runs (`GET /v1/machines/{name}/ports`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<crate::ports::PortForward>,
    /// What the machine costs now (`inspect` only; `ls` leaves it out to stay fast).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<Box<crate::stats::MachineStats>>,
    /// Why the machine was last forced off or failed to boot, while it is stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<String>,
    /// Running (commands run) but the image's init has not finished booting: `status` stays
    /// `running`, as Apple's scripts expect right after `create`; present only while true.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub booting: bool,
}

fn forward_ports_default() -> bool {
    true
}

/// The image a machine was created from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineImage {
    pub reference: String,
    pub digest: String,
}

/// A machine's platform, in OCI terms.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Platform {
    /// Always `linux`.
    pub os: String,
    /// `amd64`, `arm64`: the host's.
    pub architecture: String,
}

impl Platform {
    /// The only platform machines run on: the host's, as OCI names it.
    pub fn host() -> Self {
        Self {
            os: "linux".into(),
            architecture: match std::env::consts::ARCH {
                "x86_64" => "amd64",
                "aarch64" => "arm64",
                other => other,
            }
            .into(),
        }
    }
}

/// The user a machine logs in as (the host user who created it), as Apple's `userSetup`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserSetup {
    pub username: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
    pub shell: String,
}

impl From<&MachineUser> for UserSetup {
    fn from(u: &MachineUser) -> Self {
        Self {
            username: u.name.clone(),
            uid: u.uid,
            gid: u.gid,
            home: u.home.clone(),
            shell: u.shell.clone(),
        }
    }
}

/// An extra shared directory, as `inspect` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MachineMount {
    pub host_path: String,
    pub guest_path: String,
    pub read_only: bool,
}

impl From<&MountSpec> for MachineMount {
    fn from(m: &MountSpec) -> Self {
        Self {
            host_path: m.host_path.clone(),
            guest_path: m.guest_path.clone(),
            read_only: m.read_only,
        }
    }
}

/// Dates as ISO 8601 to the second, `2026-06-08T09:30:00Z`: what Swift's `.iso8601` date
/// decoding (Apple's tool and its tests) accepts, which fractional seconds are not.
mod iso8601 {
    use chrono::{DateTime, SecondsFormat, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&d.to_rfc3339_opts(SecondsFormat::Secs, true))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let text = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&text)
            .map(|t| t.with_timezone(&Utc))
            .map_err(serde::de::Error::custom)
    }
}

/// [`iso8601`] for optional dates.
mod iso8601_opt {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::iso8601::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
        #[derive(Deserialize)]
        struct Wrap(#[serde(with = "super::iso8601")] DateTime<Utc>);
        Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
    }
}

/// `POST /v1/machines/{name}/set` body: the settings to change; the others stay.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<u64>,
    /// Bytes; the disk can only grow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home_mount: Option<HomeMount>,
    /// A kernel path on the host; empty: the default kernel again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autostart: Option<bool>,
    /// Forward the guest's listening ports to the host's loopback; takes effect at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward_ports: Option<bool>,
}

impl SetRequest {
    /// The keys `set` takes, as users type them.
    pub const KEYS: &'static str =
        "cpus, memory, disk-size, home-mount, kernel, autostart, forward-ports";

    /// Parses `KEY=VALUE` settings as users type them: `cpus=2 memory=4G home-mount=ro`.
    pub fn parse<S: AsRef<str>>(settings: &[S]) -> Result<Self, String> {
        let mut req = SetRequest::default();
        for s in settings {
            let s = s.as_ref();
            let (key, value) = s
                .split_once('=')
                .ok_or_else(|| format!("invalid setting `{s}`: expected KEY=VALUE"))?;
            match key {
                "cpus" => {
                    req.cpus = Some(
                        value
                            .parse()
                            .map_err(|_| format!("cpus must be a number, got `{value}`"))?,
                    )
                }
                "memory" => req.memory = Some(crate::size::parse_size(value)?),
                "disk-size" => req.disk_size = Some(crate::size::parse_size(value)?),
                "home-mount" => req.home_mount = Some(value.parse()?),
                "kernel" => req.kernel = Some(value.to_string()),
                "autostart" => req.autostart = Some(on_off(key, value)?),
                "forward-ports" => req.forward_ports = Some(on_off(key, value)?),
                other => {
                    return Err(format!(
                        "unknown setting `{other}`: valid keys are {}",
                        Self::KEYS
                    ));
                }
            }
        }
        Ok(req)
    }

    /// True when it changes nothing.
    pub fn is_empty(&self) -> bool {
        *self == SetRequest::default()
    }
}

/// A switch as users type it: on or off (true/false, yes/no).
fn on_off(key: &str, value: &str) -> Result<bool, String> {
    match value {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("{key} must be on or off, got `{value}`")),
    }
}

/// `set` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetReply {
    pub machine: Machine,
    /// True when the machine runs and the change waits for the next start.
    pub takes_effect_at_next_start: bool,
}

/// `POST /v1/machines/{name}/stop` body.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopRequest {
    /// Signal name or number sent to the machine's init; absent: the image's or init's default.
    pub signal: Option<String>,
    /// Seconds to wait for a clean shutdown before the VM is killed.
    pub timeout_secs: Option<u64>,
}

/// `POST /v1/machines/{name}/clone` body: the new machine's name.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloneRequest {
    pub name: String,
}

/// `POST /v1/machines/{name}/commit` body: the name of the image to make of the machine's
/// filesystem, among the caller's images. Answered with the image's summary.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommitRequest {
    pub image: String,
}

/// `POST /v1/machines/{name}/rename` body: the machine's new name.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenameRequest {
    pub name: String,
}

/// `POST /v1/machines/{name}/snapshots` body.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateRequest {
    /// The snapshot's name; absent: one made from the time.
    #[serde(default)]
    pub name: Option<String>,
}

/// `POST /v1/machines/{name}/snapshots/{snapshot}/restore` body.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRestoreRequest {
    /// Stop the machine first if it runs (else a running machine is refused).
    #[serde(default)]
    pub force: bool,
}

/// A snapshot of a machine's disk (the files in the host home are not part of it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    pub name: String,
    pub machine: String,
    #[serde(with = "iso8601")]
    pub created_date: chrono::DateTime<chrono::Utc>,
    /// Bytes on the host the snapshot holds apart from the machine's later writes: what
    /// was written to the disk since the snapshot before it (or the machine's creation).
    pub size: u64,
}

/// The process a `run` starts, sent as the first frame of an exec session.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// Empty: the user's login shell. Otherwise run by `/bin/sh -c` as the words joined by
    /// spaces (as `ssh host CMD ARGS…` does), or as this exact argv with `no_shell`.
    pub command: Vec<String>,
    /// Execute `command` as given, each element one argument, with no shell in between.
    /// Left out of the JSON when false, so a newer CLI still talks to an older service.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_shell: bool,
    pub env: Vec<String>,
    pub workdir: Option<String>,
    /// The caller's current directory, used when it is visible inside the machine.
    pub caller_cwd: Option<String>,
    #[serde(default)]
    pub root: bool,
    /// `-u USER|UID[:GID]`.
    pub user: Option<String>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    #[serde(default)]
    pub tty: bool,
    #[serde(default)]
    pub interactive: bool,
    #[serde(default)]
    pub detach: bool,
    pub rows: Option<u16>,
    pub cols: Option<u16>,
    /// The caller's `SSH_AUTH_SOCK` (an absolute host path): forward that agent into the
    /// machine while the process runs. The service connects to it as the caller, so it
    /// reaches only an agent the caller's own processes can. Left out of the JSON when
    /// absent, so a newer CLI still talks to an older service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_auth_sock: Option<String>,
}

/// `POST /machines/{name}/connect`: a connection to a TCP port on the machine's loopback,
/// carried raw over the upgraded HTTP connection (`container machine ssh-proxy`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectRequest {
    pub port: u16,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(started: bool) -> Machine {
        let t = chrono::DateTime::parse_from_rfc3339("2026-06-08T09:30:00.123456Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        Machine {
            id: "dev".into(),
            status: if started {
                MachineState::Running
            } else {
                MachineState::Stopped
            },
            default: true,
            ip_address: started.then(|| "192.168.64.2".into()),
            reserved_ip_address: Some("192.168.64.2".into()),
            dns_name: Some("dev.machine".into()),
            cpus: 2,
            memory: 1 << 30,
            disk_size: 8 << 30,
            disk_allocated: 1 << 20,
            home_mount: HomeMount::Ro,
            created_date: t,
            started_date: started.then_some(t),
            image: MachineImage {
                reference: "alpine:3.20".into(),
                digest: "sha256:0".into(),
            },
            platform: Platform::host(),
            user_setup: UserSetup {
                username: "alice".into(),
                uid: 1000,
                gid: 1000,
                home: "/home/alice".into(),
                shell: "/bin/sh".into(),
            },
            mounts: vec![MachineMount {
                host_path: "/srv".into(),
                guest_path: "/data".into(),
                read_only: true,
            }],
            network: "default".into(),
            kernel: None,
            owner_uid: 1000,
            pending_restart: false,
            autostart: false,
            forward_ports: true,
            publish: vec![],
            ports: vec![],
            stats: None,
            stop_reason: None,
            booting: false,
        }
    }

    #[test]
    fn machines_read_as_apples_schema() {
        let running = serde_json::to_value(machine(true)).unwrap();
        assert_eq!(running["id"], "dev");
        assert_eq!(running["status"], "running");
        assert_eq!(running["default"], true);
        assert_eq!(running["ipAddress"], "192.168.64.2");
        assert_eq!(running["dnsName"], "dev.machine");
        assert_eq!(running["memory"], 1u64 << 30);
        assert_eq!(running["diskSize"], 8u64 << 30);
        assert_eq!(running["homeMount"], "ro");
        // Swift's `.iso8601` decoding takes no fractional seconds.
        assert_eq!(running["createdDate"], "2026-06-08T09:30:00Z");
        assert_eq!(running["startedDate"], "2026-06-08T09:30:00Z");
        assert_eq!(running["image"]["reference"], "alpine:3.20");
        assert_eq!(running["platform"]["os"], "linux");
        assert_eq!(running["userSetup"]["username"], "alice");
        assert_eq!(running["mounts"][0]["guestPath"], "/data");
        assert_eq!(running["ownerUid"], 1000);
        assert_eq!(running["pendingRestart"], false);
        assert_eq!(running["diskAllocated"], 1u64 << 20);
        let stopped = serde_json::to_value(machine(false)).unwrap();
        assert_eq!(stopped["status"], "stopped");
        assert!(stopped.get("startedDate").is_none(), "{stopped}");
        assert!(stopped.get("ipAddress").is_none(), "{stopped}");
        assert_eq!(stopped["reservedIpAddress"], "192.168.64.2");
        assert!(stopped.get("kernel").is_none(), "{stopped}");
        // What the service sends, the CLI reads back (to the second).
        let back: Machine = serde_json::from_value(running).unwrap();
        assert_eq!(back.started_date.unwrap().timestamp(), 1_780_911_000);
        assert_eq!(back.id, "dev");
    }
}
