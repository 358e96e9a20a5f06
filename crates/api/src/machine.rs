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
}

/// Lifecycle state of a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MachineState {
    Stopped,
    Starting,
    Running,
    Stopping,
}

impl std::fmt::Display for MachineState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Stopped => "stopped",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Stopping => "stopping",
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

/// A machine as `ls` and `inspect` show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    pub name: String,
    pub image: String,
    pub image_digest: String,
    pub created: chrono::DateTime<chrono::Utc>,
    pub started: Option<chrono::DateTime<chrono::Utc>>,
    pub state: MachineState,
    pub default: bool,
    pub ip_address: Option<String>,
    pub cpus: u32,
    pub memory: u64,
    /// Virtual size of the machine disk.
    pub disk_size: u64,
    /// Bytes the machine disk occupies on the host (allocated, not apparent).
    pub disk_allocated: u64,
    pub home_mount: HomeMount,
    pub mounts: Vec<MountSpec>,
    pub network: String,
    pub kernel: Option<String>,
    pub user: MachineUser,
    pub owner_uid: u32,
    /// Settings changed with `set` that wait for the next start.
    #[serde(default)]
    pub pending_restart: bool,
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
}

impl SetRequest {
    /// The keys `set` takes, as users type them.
    pub const KEYS: &'static str = "cpus, memory, disk-size, home-mount, kernel";

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
}
