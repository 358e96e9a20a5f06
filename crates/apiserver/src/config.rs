//! Service configuration: `config.toml` files layered per key. The user file
//! (`$XDG_CONFIG_HOME/container/config.toml`, else `~/.config/container/config.toml` of the
//! user the service runs as, its home from the password database, never `$HOME`) wins over
//! `<install prefix>/etc/container/config.toml`, which wins over the built-in defaults. Files
//! are read once, at service start. Unknown keys are refused so a typo never silently does
//! nothing.
//!
//! Registry mirrors are one key per registry (`[registry.mirrors]`, `"docker.io" = [{
//! location = "…" }, …]`): a file that lists a registry's mirrors gives the whole list, tried
//! in order before the registry itself.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use container_api::machine::HomeMount;
use container_api::size::parse_size;
use container_api::system::Property;
use serde::{Deserialize, Serialize};

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
}

/// Seconds a boot may take by default: a Debian systemd boot takes 10 s under emulation,
/// and a loaded host many times that.
const DEFAULT_BOOT_TIMEOUT: u64 = 180;

/// TCG's translation cache unless configured. QEMU's own default (1 GiB on a host with the
/// memory) left an idle Debian machine holding 326 MiB of translated code and 67 MiB of
/// QEMU's bookkeeping for it, 60 s after its boot; at 128 MiB it held 127 + 39 MiB and
/// booted within a few percent of the same time (64 MiB: 63 + 25 MiB, and boots about 30%
/// slower). `bench/idle-memory.sh`, bench/README.md.
const DEFAULT_TCG_TRANSLATION_CACHE: u64 = 128 << 20;

/// Virtualization backend selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Virtualization {
    #[default]
    Auto,
    Kvm,
    Tcg,
}

/// One file's worth of settings: every key optional, unknown keys refused.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    machine: Option<MachineSection>,
    network: Option<NetworkSection>,
    kernel: Option<KernelSection>,
    runtime: Option<RuntimeSection>,
    registry: Option<RegistrySection>,
    limits: Option<LimitsSection>,
    memory: Option<MemorySection>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct MemorySection {
    reclaim_idle_after: Option<String>,
    reclaim_pressure: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct MachineSection {
    cpus: Option<u32>,
    memory: Option<String>,
    disk_size: Option<String>,
    home_mount: Option<HomeMount>,
    kernel: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct NetworkSection {
    subnet: Option<String>,
    bridge: Option<String>,
    domain: Option<String>,
    host_names: Option<HostNames>,
    hosts_file: Option<String>,
    resolv_conf: Option<String>,
    forward_address: Option<String>,
}

/// How the host's resolver learns the machines' names (`[network] host-names`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum HostNames {
    /// systemd-resolved when it runs, else the hosts file.
    #[default]
    Auto,
    /// The bridge's per-link DNS server and routing domain in systemd-resolved.
    Resolved,
    /// A managed block in the hosts file.
    Hosts,
    /// Neither: only the responder on the gateway answers.
    None,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct KernelSection {
    binary: Option<String>,
    modules: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RuntimeSection {
    virtualization: Option<Virtualization>,
    qemu: Option<String>,
    virtiofsd: Option<String>,
    vhost_device_vsock: Option<String>,
    agent: Option<String>,
    vm_users: Option<String>,
    tcg_translation_cache: Option<String>,
    /// Seconds a boot may take until the agent reports ready.
    boot_timeout: Option<u64>,
    /// Arguments added to every virtiofsd command line, after the service's own.
    virtiofsd_args: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RegistrySection {
    insecure: Option<Vec<String>>,
    max_concurrent_downloads: Option<u32>,
    /// Registry (as references name it: `docker.io`) → its mirrors, in order.
    mirrors: Option<BTreeMap<String, Vec<MirrorEntry>>>,
}

/// One mirror of a registry, as written in config.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct MirrorEntry {
    /// `host[:port][/path]`.
    location: String,
    /// Plain HTTP and unverified TLS allowed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    insecure: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct LimitsSection {
    machines: Option<u32>,
    running_cpus: Option<u32>,
    running_memory: Option<String>,
    disk_size: Option<String>,
    image_load_size: Option<String>,
}

/// The merged, validated configuration the service runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub machine: MachineDefaults,
    pub network: NetworkConfig,
    /// Machine names on the host (`[network]` domain, host-names, hosts-file).
    pub names: NamesConfig,
    pub kernel: KernelOverride,
    pub runtime: RuntimeConfig,
    pub registry: RegistryConfig,
    pub limits: Limits,
    pub memory: MemoryConfig,
    /// The host the defaults and limits were derived from.
    pub host: HostFacts,
    /// Every key with its value and where it came from, for `system property list`.
    pub properties: Vec<Property>,
}

/// Defaults for `machine create`.
#[derive(Debug, Clone, PartialEq)]
pub struct MachineDefaults {
    pub cpus: u32,
    pub memory: u64,
    pub disk_size: u64,
    pub home_mount: HomeMount,
    pub kernel: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NetworkConfig {
    pub subnet: String,
    pub bridge: String,
    /// The host address the guests' listening ports are forwarded from (`::1` too when it
    /// is 127.0.0.1).
    pub forward_address: std::net::IpAddr,
}

/// Machine names: `NAME.DOMAIN` answered by the service's DNS responder on the gateway, and
/// how the host's resolver is pointed at it.
#[derive(Debug, Clone, PartialEq)]
pub struct NamesConfig {
    /// Lower case, without a trailing dot (`machine`).
    pub domain: String,
    pub host_names: HostNames,
    /// The hosts file the managed block goes in (`/etc/hosts`).
    pub hosts_file: PathBuf,
    /// The resolv.conf whose nameservers the responder relays the machines' other queries
    /// to (`/etc/resolv.conf`).
    pub resolv_conf: PathBuf,
}

/// A kernel named in config wins over the one installed with `system kernel set`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct KernelOverride {
    pub binary: Option<String>,
    pub modules: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct RuntimeConfig {
    pub virtualization: Virtualization,
    pub qemu: Option<String>,
    pub virtiofsd: Option<String>,
    pub vhost_device_vsock: Option<String>,
    pub agent: Option<String>,
    /// The uids (and gids of the same numbers) VMs run as, one per running VM.
    pub vm_users: VmUsers,
    /// Under software emulation, the most memory QEMU keeps translated guest code in
    /// (`-accel tcg,tb-size=`), in bytes; `None` leaves QEMU's default (the config always
    /// gives one, [`DEFAULT_TCG_TRANSLATION_CACHE`] unless set).
    pub tcg_translation_cache: Option<u64>,
    /// How long a boot may take until the agent reports ready; a VM that does not is
    /// forced off (also one adopted in the middle of its boot).
    pub boot_timeout: std::time::Duration,
    /// Added to every virtiofsd command line after the service's own arguments, so a later
    /// `--cache` wins (virtiofsd takes the last of a repeated option).
    pub virtiofsd_args: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RegistryConfig {
    pub insecure: Vec<String>,
    pub max_concurrent_downloads: u32,
    /// Each registry's mirrors (keyed as references name it: `docker.io`), tried in order
    /// before the registry.
    pub mirrors: BTreeMap<String, Vec<container_image::Mirror>>,
}

/// What one non-root user may hold at once (`[limits]`); root is exempt. A machine above
/// what the host has is refused for everyone, whatever these say.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Machines a user may have.
    pub machines: u32,
    /// vCPUs of a user's running machines, added up.
    pub running_cpus: u32,
    /// Memory of a user's running machines, added up.
    pub running_memory: u64,
    /// The largest disk a user's machine may have.
    pub disk_size: u64,
    /// The largest archive a user may upload with `image load` (it is spooled to disk whole
    /// before it is read).
    pub image_load_size: u64,
}

/// When guests give their clean page cache back to the host (`[memory]`; `runtime::reclaim`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryConfig {
    /// After this long idle; `None` (`"off"`): never for idleness.
    pub reclaim_idle_after: Option<std::time::Duration>,
    /// When the host's memory pressure (PSI `some avg10`, percent) reaches this; `None` (0):
    /// never for pressure.
    pub reclaim_pressure: Option<f64>,
}

/// `off` or a duration such as `90s` or `5m`.
fn parse_idle_after(text: &str) -> Result<Option<std::time::Duration>, String> {
    match text {
        "off" => Ok(None),
        _ => humantime::parse_duration(text)
            .map(Some)
            .map_err(|e| format!("`{text}`: {e} (a duration such as `2m`, or `off`)")),
    }
}

/// Facts about the host the defaults depend on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostFacts {
    pub cpus: u32,
    pub memory: u64,
}

impl HostFacts {
    pub fn detect() -> Self {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        let memory = nix::sys::sysinfo::sysinfo()
            .map(|i| i.ram_total())
            .unwrap_or(2 << 30);
        Self { cpus, memory }
    }
}

const GIB: u64 = 1 << 30;

fn defaults(host: HostFacts) -> FileConfig {
    FileConfig {
        machine: Some(MachineSection {
            cpus: Some((host.cpus / 2).max(1)),
            memory: Some(format!("{}G", (host.memory / 2 / GIB).max(1))),
            disk_size: Some("64G".into()),
            home_mount: Some(HomeMount::Rw),
            kernel: None,
        }),
        network: Some(NetworkSection {
            subnet: Some("192.168.64.0/24".into()),
            bridge: Some("container0".into()),
            domain: Some(DEFAULT_DOMAIN.into()),
            host_names: Some(HostNames::Auto),
            hosts_file: Some(DEFAULT_HOSTS_FILE.into()),
            resolv_conf: Some(DEFAULT_RESOLV_CONF.into()),
            forward_address: Some("127.0.0.1".into()),
        }),
        kernel: None,
        runtime: Some(RuntimeSection {
            virtualization: Some(Virtualization::Auto),
            vm_users: Some(VmUsers::default().to_string()),
            boot_timeout: Some(DEFAULT_BOOT_TIMEOUT),
            virtiofsd_args: Some(Vec::new()),
            ..Default::default()
        }),
        registry: Some(RegistrySection {
            insecure: Some(Vec::new()),
            max_concurrent_downloads: Some(3),
            mirrors: None,
        }),
        // A user's running machines may overcommit the host twice over (idle guests give
        // their free memory back), but no user holds every address of the subnet or disks
        // of any size.
        limits: Some(LimitsSection {
            machines: Some(16),
            running_cpus: Some(host.cpus * 2),
            running_memory: Some(format!("{}M", (host.memory >> 20) * 2)),
            disk_size: Some("1T".into()),
            image_load_size: Some("32G".into()),
        }),
        // An idle machine's page cache goes back after two minutes; every machine's when
        // tasks on the host stall on memory a tenth of the time.
        memory: Some(MemorySection {
            reclaim_idle_after: Some("2m".into()),
            reclaim_pressure: Some(10.0),
        }),
    }
}

/// The files consulted, highest precedence first.
pub fn config_files(install_prefix: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let user_dir = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| service_home().map(|h| h.join(".config")));
    if let Some(dir) = user_dir {
        files.push(dir.join("container/config.toml"));
    }
    files.push(install_prefix.join("etc/container/config.toml"));
    files
}

/// The install prefix: the parent of the directory holding the service binary.
pub fn install_prefix() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("/usr/local"))
}

/// A key: the path of names from the file's root to a value.
type KeyPath = Vec<String>;

/// Flattens a table into keys; a table of `registry.mirrors` is one key per registry, whose
/// value is its whole list.
fn flatten(prefix: &[String], table: &toml::Table, out: &mut BTreeMap<KeyPath, toml::Value>) {
    for (k, v) in table {
        let mut key = prefix.to_vec();
        key.push(k.clone());
        match v {
            toml::Value::Table(t) if key != ["registry", "mirrors"] => flatten(&key, t, out),
            toml::Value::Table(t) => {
                for (registry, mirrors) in t {
                    let mut key = key.clone();
                    key.push(registry.clone());
                    out.insert(key, mirrors.clone());
                }
            }
            other => {
                out.insert(key, other.clone());
            }
        }
    }
}

/// A key as `system property list` shows it: dotted, a part that holds a dot quoted
/// (`registry.mirrors."docker.io"`), as TOML writes it.
fn dotted(key: &[String]) -> String {
    key.iter()
        .map(|part| {
            if part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                part.clone()
            } else {
                format!("{part:?}")
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

fn unflatten(flat: &BTreeMap<KeyPath, toml::Value>) -> toml::Table {
    let mut root = toml::Table::new();
    for (key, value) in flat {
        let mut table = &mut root;
        let mut parts: Vec<&str> = key.iter().map(String::as_str).collect();
        let last = parts.pop().expect("a key has at least one part");
        for part in parts {
            table = table
                .entry(part)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .expect("config keys never mix tables and values");
        }
        table.insert(last.to_string(), value.clone());
    }
    root
}

fn to_table(config: &FileConfig) -> toml::Table {
    toml::Table::try_from(config).expect("FileConfig always serialises to a table")
}

/// Parses one file's text; `path` names it in errors.
fn parse_file(path: &Path, text: &str) -> Result<toml::Table, ConfigError> {
    let invalid = |message: String| ConfigError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    // Typed parse first: it reports unknown keys and wrong types with line numbers.
    let typed: FileConfig = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
    validate(&typed).map_err(invalid)?;
    Ok(to_table(&typed))
}

fn validate(config: &FileConfig) -> Result<(), String> {
    if let Some(m) = &config.machine {
        if m.cpus == Some(0) {
            return Err("machine.cpus must be at least 1".into());
        }
        for (key, value) in [("memory", &m.memory), ("disk-size", &m.disk_size)] {
            if let Some(v) = value {
                parse_size(v).map_err(|e| format!("machine.{key}: {e}"))?;
            }
        }
    }
    if let Some(l) = &config.limits {
        for (key, value) in [
            ("running-memory", &l.running_memory),
            ("disk-size", &l.disk_size),
            ("image-load-size", &l.image_load_size),
        ] {
            if let Some(v) = value {
                parse_size(v).map_err(|e| format!("limits.{key}: {e}"))?;
            }
        }
    }
    if let Some(r) = &config.runtime
        && let Some(v) = &r.vm_users
    {
        v.parse::<VmUsers>()
            .map_err(|e| format!("runtime.vm-users: {e}"))?;
    }
    if let Some(r) = &config.runtime
        && let Some(t) = r.boot_timeout
        && !(10..=3600).contains(&t)
    {
        return Err(format!(
            "runtime.boot-timeout {t} must be 10 to 3600 (seconds)"
        ));
    }
    if let Some(mirrors) = config.registry.as_ref().and_then(|r| r.mirrors.as_ref()) {
        mirrors_of(mirrors)?;
    }
    if let Some(v) = config
        .runtime
        .as_ref()
        .and_then(|r| r.tcg_translation_cache.as_ref())
    {
        let bytes = parse_size(v).map_err(|e| format!("runtime.tcg-translation-cache: {e}"))?;
        if bytes < 1 << 20 {
            return Err(format!(
                "runtime.tcg-translation-cache `{v}` is below QEMU's smallest, 1M"
            ));
        }
    }
    if let Some(m) = &config.memory {
        if let Some(v) = &m.reclaim_idle_after {
            parse_idle_after(v).map_err(|e| format!("memory.reclaim-idle-after: {e}"))?;
        }
        if let Some(p) = m.reclaim_pressure
            && !(0.0..=100.0).contains(&p)
        {
            return Err(format!(
                "memory.reclaim-pressure `{p}` must be a percentage from 0 (off) to 100"
            ));
        }
    }
    if let Some(a) = config
        .network
        .as_ref()
        .and_then(|n| n.forward_address.as_ref())
        && a.parse::<std::net::IpAddr>().is_err()
    {
        return Err(format!(
            "network.forward-address `{a}` is not an IP address (127.0.0.1 keeps forwarded ports to this host)"
        ));
    }
    if let Some(n) = &config.network
        && let Some(bridge) = &n.bridge
        && (bridge.is_empty() || bridge.len() > 15)
    {
        return Err(format!(
            "network.bridge `{bridge}` must be 1 to 15 characters (a Linux interface name)"
        ));
    }
    if let Some(n) = &config.network
        && let Some(domain) = &n.domain
        && !valid_domain(domain)
    {
        return Err(format!(
            "network.domain `{domain}` must be a DNS name of letters, digits and `-` in dot-separated labels, such as `machine` or `vm.internal`"
        ));
    }
    if let Some(n) = &config.network
        && let Some(file) = &n.hosts_file
        && !Path::new(file).is_absolute()
    {
        return Err(format!(
            "network.hosts-file `{file}` must be an absolute path"
        ));
    }
    if let Some(n) = &config.network
        && let Some(file) = &n.resolv_conf
        && !Path::new(file).is_absolute()
    {
        return Err(format!(
            "network.resolv-conf `{file}` must be an absolute path"
        ));
    }
    Ok(())
}

/// The domain machine names are answered under unless `[network] domain` says otherwise.
pub const DEFAULT_DOMAIN: &str = "machine";
/// The hosts file the managed block of machine names goes in by default.
pub const DEFAULT_HOSTS_FILE: &str = "/etc/hosts";
/// Where the machines' queries outside their domain are relayed to by default.
pub const DEFAULT_RESOLV_CONF: &str = "/etc/resolv.conf";

/// A DNS name of at most 200 characters (room for a machine name in front), each label 1 to
/// 63 letters, digits or inner `-`, no trailing dot.
fn valid_domain(domain: &str) -> bool {
    domain.len() <= 200
        && domain.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// The mirrors of each registry, checked: a registry as references name it, each location
/// `host[:port][/path]`.
fn mirrors_of(
    table: &BTreeMap<String, Vec<MirrorEntry>>,
) -> Result<BTreeMap<String, Vec<container_image::Mirror>>, String> {
    let mut out = BTreeMap::new();
    for (registry, entries) in table {
        let host = container_image::registry::normalise_server(registry);
        if host != *registry || host.is_empty() || registry.contains('/') {
            return Err(format!(
                "registry.mirrors: `{registry}` is not a registry host as image references \
                 name it (e.g. `docker.io`, `quay.io`, `registry.example:5000`)"
            ));
        }
        let mirrors = entries
            .iter()
            .map(|m| container_image::Mirror::parse(&m.location, m.insecure))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("registry.mirrors.\"{registry}\": {e}"))?;
        out.insert(host, mirrors);
    }
    Ok(out)
}

/// Loads and merges the given files (highest precedence first) over the defaults.
pub fn load(files: &[PathBuf], host: HostFacts) -> Result<Config, ConfigError> {
    let mut merged: BTreeMap<KeyPath, (toml::Value, String)> = BTreeMap::new();
    for path in files {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.clone(),
                    source,
                });
            }
        };
        let mut flat = BTreeMap::new();
        flatten(&[], &parse_file(path, &text)?, &mut flat);
        for (k, v) in flat {
            merged.entry(k).or_insert((v, path.display().to_string()));
        }
    }
    let mut flat_defaults = BTreeMap::new();
    flatten(&[], &to_table(&defaults(host)), &mut flat_defaults);
    for (k, v) in flat_defaults {
        merged.entry(k).or_insert((v, "default".into()));
    }
    let values: BTreeMap<KeyPath, toml::Value> = merged
        .iter()
        .map(|(k, (v, _))| (k.clone(), v.clone()))
        .collect();
    let file: FileConfig = unflatten(&values)
        .try_into()
        .map_err(|e: toml::de::Error| ConfigError::Invalid {
            path: PathBuf::from("<merged>"),
            message: e.to_string(),
        })?;
    let properties = merged
        .into_iter()
        .map(|(key, (value, source))| Property {
            key: dotted(&key),
            value: serde_json::to_value(&value).unwrap_or(serde_json::Value::Null),
            source,
        })
        .collect();
    resolve(file, properties, host)
}

fn resolve(
    file: FileConfig,
    properties: Vec<Property>,
    host: HostFacts,
) -> Result<Config, ConfigError> {
    // Every key has a default, so the unwraps below only see merged values.
    let m = file.machine.unwrap_or_default();
    let n = file.network.unwrap_or_default();
    let k = file.kernel.unwrap_or_default();
    let r = file.runtime.unwrap_or_default();
    let g = file.registry.unwrap_or_default();
    let l = file.limits.unwrap_or_default();
    let mem = file.memory.unwrap_or_default();
    let size =
        |v: Option<String>, fallback: u64| v.and_then(|s| parse_size(&s).ok()).unwrap_or(fallback);
    // Each file's mirrors were checked when it was read; these are the merged lists.
    let mirrors =
        mirrors_of(&g.mirrors.unwrap_or_default()).map_err(|message| ConfigError::Invalid {
            path: PathBuf::from("<merged>"),
            message,
        })?;
    Ok(Config {
        machine: MachineDefaults {
            cpus: m.cpus.unwrap_or(1),
            memory: size(m.memory, GIB),
            disk_size: size(m.disk_size, 64 * GIB),
            home_mount: m.home_mount.unwrap_or_default(),
            kernel: m.kernel,
        },
        network: NetworkConfig {
            subnet: n.subnet.unwrap_or_else(|| "192.168.64.0/24".into()),
            bridge: n.bridge.unwrap_or_else(|| "container0".into()),
            forward_address: n
                .forward_address
                .and_then(|a| a.parse().ok())
                .unwrap_or(std::net::Ipv4Addr::LOCALHOST.into()),
        },
        names: NamesConfig {
            domain: n
                .domain
                .unwrap_or_else(|| DEFAULT_DOMAIN.into())
                .to_ascii_lowercase(),
            host_names: n.host_names.unwrap_or_default(),
            hosts_file: n
                .hosts_file
                .unwrap_or_else(|| DEFAULT_HOSTS_FILE.into())
                .into(),
            resolv_conf: n
                .resolv_conf
                .unwrap_or_else(|| DEFAULT_RESOLV_CONF.into())
                .into(),
        },
        kernel: KernelOverride {
            binary: k.binary,
            modules: k.modules,
        },
        runtime: RuntimeConfig {
            virtualization: r.virtualization.unwrap_or_default(),
            qemu: r.qemu,
            virtiofsd: r.virtiofsd,
            vhost_device_vsock: r.vhost_device_vsock,
            agent: r.agent,
            vm_users: r.vm_users.and_then(|v| v.parse().ok()).unwrap_or_default(),
            tcg_translation_cache: Some(
                r.tcg_translation_cache
                    .as_deref()
                    .and_then(|s| parse_size(s).ok())
                    .unwrap_or(DEFAULT_TCG_TRANSLATION_CACHE),
            ),
            boot_timeout: std::time::Duration::from_secs(
                r.boot_timeout.unwrap_or(DEFAULT_BOOT_TIMEOUT),
            ),
            virtiofsd_args: r.virtiofsd_args.unwrap_or_default(),
        },
        registry: RegistryConfig {
            insecure: g.insecure.unwrap_or_default(),
            max_concurrent_downloads: g.max_concurrent_downloads.unwrap_or(3).max(1),
            mirrors,
        },
        limits: Limits {
            machines: l.machines.unwrap_or(16),
            running_cpus: l.running_cpus.unwrap_or(host.cpus * 2),
            running_memory: size(l.running_memory, host.memory * 2),
            disk_size: size(l.disk_size, 1 << 40),
            image_load_size: size(l.image_load_size, 32 * GIB),
        },
        memory: MemoryConfig {
            reclaim_idle_after: mem
                .reclaim_idle_after
                .as_deref()
                .map_or(Ok(None), parse_idle_after)
                .unwrap_or(None),
            reclaim_pressure: mem.reclaim_pressure.filter(|p| *p > 0.0),
        },
        host,
        properties,
    })
}

/// VMs' users (`[runtime] vm-users`); the runtime picks from it.
/// The reserved range: `first` to `last`, both included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmUsers {
    pub first: u32,
    pub last: u32,
}

impl Default for VmUsers {
    /// 65536 ids high above the usual account (1000+) and subordinate-id (100000+) ranges.
    fn default() -> Self {
        VmUsers {
            first: 0x7000_0000,
            last: 0x7000_ffff,
        }
    }
}

impl std::str::FromStr for VmUsers {
    type Err = String;

    /// `FIRST-LAST`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not a uid range FIRST-LAST (e.g. 1879048192-1879113727)");
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let (first, last): (u32, u32) = (
            a.trim().parse().map_err(|_| bad())?,
            b.trim().parse().map_err(|_| bad())?,
        );
        if first == 0 || last < first || last == u32::MAX {
            return Err(format!(
                "`{s}`: the range must not hold 0 or 4294967295 and must not be empty"
            ));
        }
        Ok(VmUsers { first, last })
    }
}

impl std::fmt::Display for VmUsers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// The home directory of the user the service runs as, from the password database: never
/// `$HOME`, which is whatever the service's starter had.
pub fn service_home() -> Option<PathBuf> {
    nix::unistd::User::from_uid(nix::unistd::geteuid())
        .ok()
        .flatten()
        .map(|u| u.dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: HostFacts = HostFacts {
        cpus: 8,
        memory: 16 << 30,
    };

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn defaults_are_half_the_host() {
        let c = load(&[], HOST).unwrap();
        assert_eq!(c.machine.cpus, 4);
        assert_eq!(c.machine.memory, 8 << 30);
        assert_eq!(c.machine.disk_size, 64 << 30);
        assert_eq!(c.machine.home_mount, HomeMount::Rw);
        assert_eq!(c.network.subnet, "192.168.64.0/24");
        let small = load(
            &[],
            HostFacts {
                cpus: 1,
                memory: 1 << 30,
            },
        )
        .unwrap();
        assert_eq!(small.machine.cpus, 1);
        assert_eq!(small.machine.memory, 1 << 30);
    }

    #[test]
    fn memory_reclaim_is_on_by_default_and_each_trigger_turns_off() {
        let c = load(&[], HOST).unwrap();
        assert_eq!(
            c.memory.reclaim_idle_after,
            Some(std::time::Duration::from_secs(120))
        );
        assert_eq!(c.memory.reclaim_pressure, Some(10.0));
        let dir = tempfile::tempdir().unwrap();
        let off = write(
            dir.path(),
            "off.toml",
            "[memory]\nreclaim-idle-after = \"off\"\nreclaim-pressure = 0\n",
        );
        let c = load(&[off], HOST).unwrap();
        assert_eq!(
            (c.memory.reclaim_idle_after, c.memory.reclaim_pressure),
            (None, None)
        );
        let fast = write(
            dir.path(),
            "fast.toml",
            "[memory]\nreclaim-idle-after = \"90s\"\n",
        );
        let c = load(&[fast], HOST).unwrap();
        assert_eq!(
            c.memory.reclaim_idle_after,
            Some(std::time::Duration::from_secs(90))
        );
        for bad in [
            "[memory]\nreclaim-idle-after = \"soon\"\n",
            "[memory]\nreclaim-pressure = 150\n",
            "[runtime]\ntcg-translation-cache = \"100K\"\n",
        ] {
            let f = write(dir.path(), "bad.toml", bad);
            assert!(load(&[f], HOST).is_err(), "{bad}");
        }
    }

    #[test]
    fn virtiofsd_args_are_passed_as_written() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(&[], HOST).unwrap().runtime.virtiofsd_args.is_empty());
        let f = write(
            dir.path(),
            "fs.toml",
            "[runtime]\nvirtiofsd-args = [\"--cache\", \"never\", \"--xattr\"]\n",
        );
        assert_eq!(
            load(&[f], HOST).unwrap().runtime.virtiofsd_args,
            ["--cache", "never", "--xattr"]
        );
    }

    #[test]
    fn the_translation_cache_is_bounded_unless_set() {
        let dir = tempfile::tempdir().unwrap();
        let cache = |files: &[PathBuf]| load(files, HOST).unwrap().runtime.tcg_translation_cache;
        assert_eq!(cache(&[]), Some(128 << 20));
        let f = write(
            dir.path(),
            "tb.toml",
            "[runtime]\ntcg-translation-cache = \"1G\"\n",
        );
        assert_eq!(cache(&[f]), Some(1 << 30));
    }

    #[test]
    fn first_file_wins_per_key() {
        let dir = tempfile::tempdir().unwrap();
        let user = write(dir.path(), "user.toml", "[machine]\ncpus = 3\n");
        let system = write(
            dir.path(),
            "system.toml",
            "[machine]\ncpus = 6\nmemory = \"2G\"\n[network]\nsubnet = \"10.9.0.0/24\"\n",
        );
        let c = load(&[user.clone(), system.clone()], HOST).unwrap();
        assert_eq!(c.machine.cpus, 3);
        assert_eq!(c.machine.memory, 2 << 30);
        assert_eq!(c.network.subnet, "10.9.0.0/24");
        let source = |key: &str| {
            c.properties
                .iter()
                .find(|p| p.key == key)
                .map(|p| p.source.clone())
                .unwrap()
        };
        assert_eq!(source("machine.cpus"), user.display().to_string());
        assert_eq!(source("machine.memory"), system.display().to_string());
        assert_eq!(source("machine.disk-size"), "default");
    }

    #[test]
    fn malformed_toml_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let bad = write(dir.path(), "bad.toml", "[machine]\ncpus = 2\nmemory = \n");
        let e = load(std::slice::from_ref(&bad), HOST)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&bad.display().to_string()), "{e}");
        assert!(e.contains("line 3"), "{e}");
    }

    #[test]
    fn machine_names_default_to_the_machine_domain_and_can_be_changed() {
        let c = load(&[], HOST).unwrap();
        assert_eq!(c.names.domain, "machine");
        assert_eq!(c.names.host_names, HostNames::Auto);
        assert_eq!(c.names.hosts_file, Path::new("/etc/hosts"));
        assert_eq!(c.names.resolv_conf, Path::new("/etc/resolv.conf"));
        let dir = tempfile::tempdir().unwrap();
        let set = write(
            dir.path(),
            "names.toml",
            "[network]\ndomain = \"VM.test\"\nhost-names = \"hosts\"\nhosts-file = \"/tmp/h\"\n\
             resolv-conf = \"/tmp/r\"\n",
        );
        let c = load(&[set], HOST).unwrap();
        assert_eq!(c.names.domain, "vm.test");
        assert_eq!(c.names.host_names, HostNames::Hosts);
        assert_eq!(c.names.hosts_file, Path::new("/tmp/h"));
        assert_eq!(c.names.resolv_conf, Path::new("/tmp/r"));
        for bad in [
            "domain = \"\"",
            "domain = \"machine.\"",
            "domain = \"a b\"",
            "domain = \"-x\"",
            "hosts-file = \"hosts\"",
            "resolv-conf = \"resolv.conf\"",
            "host-names = \"dnsmasq\"",
        ] {
            let f = write(dir.path(), "bad.toml", &format!("[network]\n{bad}\n"));
            assert!(load(&[f], HOST).is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let typo = write(dir.path(), "typo.toml", "[machine]\ncpu = 2\n");
        assert!(load(&[typo], HOST).unwrap_err().to_string().contains("cpu"));
        let size = write(dir.path(), "size.toml", "[machine]\nmemory = \"lots\"\n");
        assert!(
            load(&[size], HOST)
                .unwrap_err()
                .to_string()
                .contains("machine.memory")
        );
        let mount = write(
            dir.path(),
            "mount.toml",
            "[machine]\nhome-mount = \"maybe\"\n",
        );
        assert!(load(&[mount], HOST).is_err());
        let users = write(
            dir.path(),
            "users.toml",
            "[runtime]\nvm-users = \"0-100\"\n",
        );
        assert!(
            load(&[users], HOST)
                .unwrap_err()
                .to_string()
                .contains("runtime.vm-users")
        );
        let users = write(
            dir.path(),
            "ok.toml",
            "[runtime]\nvm-users = \"70000-70099\"\n",
        );
        assert_eq!(
            load(&[users], HOST).unwrap().runtime.vm_users,
            VmUsers {
                first: 70000,
                last: 70099
            }
        );
    }

    #[test]
    fn mirrors_are_listed_per_registry_and_the_first_file_s_list_wins() {
        let dir = tempfile::tempdir().unwrap();
        let user = write(
            dir.path(),
            "user.toml",
            "[registry.mirrors]\n\"docker.io\" = [\n  { location = \"127.0.0.1:5000\" },\n  \
             { location = \"mirror.example/hub\", insecure = true },\n]\n",
        );
        let system = write(
            dir.path(),
            "system.toml",
            "[[registry.mirrors.\"docker.io\"]]\nlocation = \"ignored.example\"\n\
             [[registry.mirrors.\"quay.io\"]]\nlocation = \"quay-mirror.example\"\n",
        );
        let c = load(&[user.clone(), system.clone()], HOST).unwrap();
        let hub = &c.registry.mirrors["docker.io"];
        assert_eq!(
            hub.iter().map(|m| m.location()).collect::<Vec<_>>(),
            ["127.0.0.1:5000", "mirror.example/hub"]
        );
        assert_eq!((hub[0].insecure, hub[1].insecure), (false, true));
        assert_eq!(
            c.registry.mirrors["quay.io"][0].location(),
            "quay-mirror.example"
        );
        let source = |key: &str| {
            c.properties
                .iter()
                .find(|p| p.key == key)
                .map(|p| p.source.clone())
        };
        assert_eq!(
            source("registry.mirrors.\"docker.io\""),
            Some(user.display().to_string())
        );
        assert_eq!(
            source("registry.mirrors.\"quay.io\""),
            Some(system.display().to_string())
        );
        assert!(load(&[], HOST).unwrap().registry.mirrors.is_empty());
    }

    #[test]
    fn bad_mirrors_are_refused_naming_the_file_and_the_registry() {
        let dir = tempfile::tempdir().unwrap();
        for (text, says) in [
            (
                "[registry.mirrors]\n\"docker.io\" = [{ location = \"http://m.example\" }]\n",
                "without a scheme",
            ),
            (
                "[registry.mirrors]\n\"docker.io\" = [{ location = \"M.example\" }]\n",
                "host[:port][/path]",
            ),
            (
                "[registry.mirrors]\n\"docker.io\" = [{ url = \"m.example\" }]\n",
                "unknown field `url`",
            ),
            (
                "[registry.mirrors]\n\"https://index.docker.io/v1/\" = [{ location = \"m.example\" }]\n",
                "not a registry host",
            ),
            (
                "[registry.mirrors]\n\"docker.io\" = \"m.example\"\n",
                "expected a sequence",
            ),
        ] {
            let f = write(dir.path(), "bad.toml", text);
            let e = load(std::slice::from_ref(&f), HOST)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&f.display().to_string()) && e.contains(says),
                "{text}: {e}"
            );
        }
    }

    #[test]
    fn xdg_config_home_is_honoured() {
        // Reads the environment; the variables are restored by the process only, so use
        // values that cannot clash with other tests.
        let files = config_files(Path::new("/opt/container"));
        assert_eq!(
            files.last().unwrap(),
            Path::new("/opt/container/etc/container/config.toml")
        );
    }
}
