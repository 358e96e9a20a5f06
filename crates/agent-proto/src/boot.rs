//! The boot config: everything the agent needs to bring a machine up, written by the service
//! into each boot's initramfs at [`BOOT_CONFIG_PATH`] as JSON. Unknown fields are refused so
//! a service and an agent that disagree fail loudly at boot, in the boot log.

use serde::{Deserialize, Serialize};

/// Where the boot config sits in the initramfs.
pub const BOOT_CONFIG_PATH: &str = "/container/boot.json";

/// How a machine shares its user's home.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HomeMount {
    /// The host home, read-write, at the same path.
    Rw,
    /// The host home, read-only, at the same path.
    Ro,
    /// A home of its own on the machine disk, filled from /etc/skel.
    None,
}

/// A virtio-fs share to mount.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Share {
    /// The virtio-fs tag of the device.
    pub tag: String,
    /// Absolute path in the machine; created when missing.
    pub guest_path: String,
    pub read_only: bool,
}

/// The machine user to provision on first boot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserSpec {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
    /// The host user's shell; `/bin/bash`, then `/bin/sh` when the image lacks it.
    pub shell: String,
}

/// Guest network settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The guest interface, e.g. `eth0`.
    pub interface: String,
    /// The guest address with its prefix, e.g. `192.168.64.2/24`.
    pub address_cidr: String,
    /// The default gateway.
    pub gateway: String,
    /// Written to /etc/resolv.conf when not empty.
    pub nameservers: Vec<String>,
}

fn default_port() -> u32 {
    crate::PORT
}

fn default_ready_port() -> u32 {
    crate::READY_PORT
}

fn default_init() -> Vec<String> {
    vec!["/sbin/init".to_string()]
}

/// What the agent needs to bring a machine up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootConfig {
    /// The protocol version of the service that wrote it.
    pub version: u32,
    pub machine_id: String,
    /// The machine's identity (32 hex digits), new for a clone: a disk that carries another
    /// one was copied, so the guest takes a new machine-id and redoes the user setup. Empty
    /// when the service has none for it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub instance_id: String,
    pub hostname: String,
    /// The machine disk, e.g. `/dev/vda` (ext4).
    pub root_device: String,
    /// Grow the root filesystem online to fill the device.
    pub grow_root: bool,
    /// Module files in the initramfs, in load order (dependencies first).
    pub modules: Vec<String>,
    pub shares: Vec<Share>,
    pub user: Option<UserSpec>,
    pub home_mount: HomeMount,
    pub network: Option<NetConfig>,
    #[serde(default = "default_port")]
    pub vsock_port: u32,
    /// The host port the agent tells it is ready on.
    #[serde(default = "default_ready_port")]
    pub ready_port: u32,
    /// The host's clock at boot; 0 leaves the guest clock alone.
    pub time_unix_ns: u64,
    /// The image's init and its arguments.
    #[serde(default = "default_init")]
    pub init: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_port_and_init() {
        let json = r#"{"version":1,"machine_id":"m","hostname":"h","root_device":"/dev/vda",
            "grow_root":true,"modules":[],"shares":[],"user":null,"home_mount":"none",
            "network":null,"time_unix_ns":0}"#;
        let cfg: BootConfig = serde_json::from_str(json).unwrap();
        assert_eq!(cfg.vsock_port, crate::PORT);
        assert_eq!(cfg.ready_port, crate::READY_PORT);
        assert_eq!(cfg.init, vec!["/sbin/init"]);
    }

    #[test]
    fn unknown_fields_are_refused() {
        let json = r#"{"version":1,"machine_id":"m","hostname":"h","root_device":"/dev/vda",
            "grow_root":true,"modules":[],"shares":[],"user":null,"home_mount":"none",
            "network":null,"time_unix_ns":0,"surprise":1}"#;
        let err = serde_json::from_str::<BootConfig>(json).unwrap_err();
        assert!(err.to_string().contains("surprise"), "{err}");
    }
}
