//! Machine networking: one bridge (default `container0`) holding the gateway address of the
//! configured subnet, one persistent tap per running machine as a port of it, masquerade for
//! traffic from the subnet leaving the host (our own nftables table), and IPv4 forwarding,
//! enabled while a tap exists and restored to its previous value when none is left.
//!
//! Each machine holds a sticky lease (address and MAC) from create to rm, persisted in
//! `<root>/network/leases.json`. Invariants: an address is leased to at most one machine and
//! is never the subnet's network, gateway or broadcast address; every change of the host is
//! made whole or undone (an operation that fails leaves no half-configured link, rule or
//! sysctl behind); and after `reconcile` no tap of ours exists that belongs to no running
//! machine. Side effects go through [`HostNet`] ([`RealHost`] on a real host).
//!
//! Machine names (`NAME.DOMAIN`, [`dns`]) are answered from the lease book itself, by a DNS
//! responder that listens on the gateway address once the bridge is up; the host's resolver
//! is pointed at it, or given the names, through [`HostNames`] ([`host_names`]), told at
//! each change of the book. The responder is each guest's one nameserver: it relays a
//! machine's other queries to the host's resolvers ([`dns_forward`], read from a resolv.conf
//! at each query, [`resolv`]).

pub mod dns;
pub mod dns_forward;
pub mod host;
pub mod host_names;
pub mod leases;
pub mod real;
pub mod resolv;
pub mod subnet;
#[allow(unsafe_code)]
pub mod tap;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use container_agent_proto::NetConfig;
use sha2::{Digest, Sha256};

use crate::config::NetworkConfig;
use crate::fsutil;

pub use host::{HostError, HostNet, LinkInfo, NatRules, Port, RouteInfo};
pub use host_names::HostNames;
pub use leases::{Exhausted, mac_for};
pub use real::{NFT_TABLE, RealHost};
pub use subnet::{Subnet, SubnetError};

/// Every tap the service creates is named with this prefix (and ten hex digits of the
/// machine name's SHA-256), which is how reconciliation recognises its own.
pub const TAP_PREFIX: &str = "ctap-";
/// The guest's interface: the first (only) virtio-net device.
pub const GUEST_INTERFACE: &str = "eth0";

/// A machine's address on the machine network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub ip: Ipv4Addr,
    pub prefix: u8,
    /// `52:54:00:xx:yy:zz`, for QEMU's `-device virtio-net-device,mac=`.
    pub mac: String,
    pub gateway: Ipv4Addr,
}

impl Lease {
    /// `192.168.64.2/24`.
    pub fn cidr(&self) -> String {
        format!("{}/{}", self.ip, self.prefix)
    }
}

/// What `reconcile` cleaned up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Machines whose leases were freed because they no longer exist.
    pub released: Vec<String>,
    /// Taps deleted because no running machine owns them.
    pub removed_taps: Vec<String>,
}

/// Why a network operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error(
        "invalid subnet in the [network] table of the configuration: set an IPv4 network with a prefix from /8 to /30, such as 192.168.64.0/24"
    )]
    InvalidSubnet(#[source] SubnetError),
    #[error(
        "invalid bridge name `{0}` in the [network] table of the configuration: use 1 to 15 letters, digits, `-`, `_` or `.`"
    )]
    InvalidBridgeName(String),
    #[error(
        "the machine subnet {subnet} overlaps the host route {route}: set another subnet in the [network] table of the configuration"
    )]
    Overlap { subnet: Subnet, route: String },
    #[error(
        "no network address for machine `{machine}`: remove machines you no longer need, or set a larger subnet in the [network] table of the configuration"
    )]
    Exhausted {
        machine: String,
        #[source]
        source: Exhausted,
    },
    #[error(
        "the network bridge name `{bridge}` is taken by a link of kind `{kind}`: delete that link or set another bridge name in the [network] table of the configuration"
    )]
    BridgeNameTaken { bridge: String, kind: String },
    #[error("machine `{0}` has no network address")]
    NotLeased(String),
    #[error(
        "reading the lease file {}: move it aside to start with no leases",
        path.display()
    )]
    LoadLeases {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing the lease file {}", path.display())]
    SaveLeases {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("configuring the host network")]
    Host(#[from] HostError),
}

/// An error with its causes, for a log line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

/// The tap of a machine: `ctap-` and ten hex digits of the SHA-256 of its name (15 bytes,
/// the longest interface name Linux takes).
pub fn tap_name(machine: &str) -> String {
    let digest = Sha256::digest(machine.as_bytes());
    format!("{TAP_PREFIX}{}", &hex::encode(digest)[..10])
}

fn valid_link_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// The machine network of one service.
#[derive(Debug)]
pub struct Network {
    subnet: Subnet,
    bridge: String,
    leases_path: PathBuf,
    /// Where the resolvers the responder relays to are read from.
    resolv_conf: PathBuf,
    host: Arc<dyn HostNet>,
    /// Shared with the DNS responder, which reads it at each query.
    book: Arc<Mutex<leases::LeaseBook>>,
    /// Serialises changes of the host (bridge, taps, NAT, forwarding).
    host_lock: tokio::sync::Mutex<()>,
    names: Option<Names>,
}

/// Machine names: the responder's zone, the host's resolver, and the responder's tasks once
/// it listens.
#[derive(Debug)]
struct Names {
    zone: dns::Zone,
    host: Box<dyn HostNames>,
    listening: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// Every machine's name and address, sorted by name.
fn named(book: &leases::LeaseBook) -> Vec<(String, Ipv4Addr)> {
    book.names()
        .filter_map(|n| Some((n.to_string(), book.get(n)?)))
        .collect()
}

impl Network {
    /// Parses the configuration and loads the leases under `root`; touches nothing on the
    /// host (the bridge is made at the first [`Network::attach`] or [`Network::ensure_bridge`]).
    pub fn open(
        root: &Path,
        config: &NetworkConfig,
        host: Arc<dyn HostNet>,
    ) -> Result<Self, NetworkError> {
        let subnet: Subnet = config.subnet.parse().map_err(NetworkError::InvalidSubnet)?;
        if !valid_link_name(&config.bridge) {
            return Err(NetworkError::InvalidBridgeName(config.bridge.clone()));
        }
        let dir = root.join("network");
        let leases_path = dir.join("leases.json");
        std::fs::create_dir_all(&dir).map_err(|source| NetworkError::SaveLeases {
            path: leases_path.clone(),
            source,
        })?;
        let file = fsutil::read_json::<leases::LeaseFile>(&leases_path).map_err(|source| {
            NetworkError::LoadLeases {
                path: leases_path.clone(),
                source,
            }
        })?;
        let (book, dropped) = match file {
            Some(file) => leases::LeaseBook::from_file(subnet, file),
            None => (leases::LeaseBook::new(subnet), Vec::new()),
        };
        let network = Self {
            subnet,
            bridge: config.bridge.clone(),
            leases_path,
            resolv_conf: crate::config::DEFAULT_RESOLV_CONF.into(),
            host,
            book: Arc::new(Mutex::new(book)),
            host_lock: tokio::sync::Mutex::new(()),
            names: None,
        };
        if !dropped.is_empty() {
            for (name, ip) in &dropped {
                tracing::warn!(
                    machine = %name, %ip, %subnet,
                    "lease dropped: the address is not in the configured subnet; the machine gets a new one"
                );
            }
            network.save(&network.book())?;
        }
        Ok(network)
    }

    /// Relays the guests' queries outside the machine domain to the nameservers of
    /// `resolv_conf` instead of /etc/resolv.conf's.
    pub fn with_resolv_conf(mut self, resolv_conf: PathBuf) -> Self {
        self.resolv_conf = resolv_conf;
        self
    }

    /// Answers machine names under `domain` (once the bridge is up) and keeps `host` told;
    /// tells it the names there are now.
    pub fn with_names(mut self, domain: &str, host: Box<dyn HostNames>) -> Self {
        let names = Names {
            zone: dns::Zone::new(domain, self.subnet),
            host,
            listening: Mutex::new(Vec::new()),
        };
        if let Err(e) = names.host.names(&named(&self.book())) {
            tracing::warn!(error = %error_chain(&e), "could not give the host the machine names");
        }
        self.names = Some(names);
        self
    }

    /// The DNS name of a machine with an address: `NAME.DOMAIN`.
    pub fn dns_name(&self, machine: &str) -> Option<String> {
        let names = self.names.as_ref()?;
        Some(format!("{machine}.{}", names.zone.domain()))
    }

    /// Starts the name responder when the bridge exists already (a restarted service; a
    /// bridge is otherwise made at the first boot, and the responder starts with it).
    pub async fn start_names(&self) {
        let _host = self.host_lock.lock().await;
        let exists = match self.host.links().await {
            Ok(links) => links.iter().any(|l| l.name == self.bridge),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the host's links");
                false
            }
        };
        if exists {
            self.listen_for_names().await;
        }
    }

    /// Binds the responder to the gateway's port 53 (UDP and TCP) unless it listens, and
    /// tells the host's resolver. A failure is logged (names stay unanswered; the next
    /// bridge check tries again), never fatal: machines work without names.
    async fn listen_for_names(&self) {
        let Some(names) = &self.names else {
            return;
        };
        if !names
            .listening
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
        {
            return;
        }
        let at = std::net::SocketAddr::from((self.gateway(), dns::DNS_PORT));
        let bound = async {
            let udp = tokio::net::UdpSocket::bind(at).await?;
            let tcp = tokio::net::TcpListener::bind(at).await?;
            Ok::<_, std::io::Error>((udp, tcp))
        };
        let (udp, tcp) = match bound.await {
            Ok(sockets) => sockets,
            Err(e) => {
                tracing::warn!(%at, error = %e, "machine names are not answered: cannot listen for DNS");
                return;
            }
        };
        let upstreams = dns_forward::ResolvConf {
            path: self.resolv_conf.clone(),
            responder: self.gateway(),
        };
        let responder = Arc::new(dns::Responder {
            zone: names.zone.clone(),
            directory: Arc::new(dns::Leased(self.book.clone())),
            forwarder: dns_forward::Forwarder::new(Arc::new(upstreams)),
        });
        *names.listening.lock().unwrap_or_else(|p| p.into_inner()) = vec![
            tokio::spawn(dns::serve_udp(udp, responder.clone())),
            tokio::spawn(dns::serve_tcp(tcp, responder)),
        ];
        let resolvers = resolv::upstreams_in(&self.resolv_conf, self.gateway());
        tracing::info!(
            %at, domain = names.zone.domain(), host = %names.host.describe(),
            resolv_conf = %self.resolv_conf.display(), ?resolvers,
            "answering machine names, and relaying the machines' other queries"
        );
        if resolvers.is_empty() {
            tracing::warn!(
                resolv_conf = %self.resolv_conf.display(),
                "no nameserver to relay the machines' queries to: names outside the machine domain get SERVFAIL until the file names one"
            );
        }
        if let Err(e) = names.host.link_up(&self.bridge, self.gateway()).await {
            tracing::warn!(error = %error_chain(&e), "could not point the host's resolver at the machine names");
        }
    }

    pub fn subnet(&self) -> Subnet {
        self.subnet
    }

    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    pub fn gateway(&self) -> Ipv4Addr {
        self.subnet.gateway()
    }

    fn book(&self) -> MutexGuard<'_, leases::LeaseBook> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save(&self, book: &leases::LeaseBook) -> Result<(), NetworkError> {
        fsutil::write_json(&self.leases_path, &book.to_file()).map_err(|source| {
            NetworkError::SaveLeases {
                path: self.leases_path.clone(),
                source,
            }
        })
    }

    /// Applies `change` to a copy of the book, persists the copy, then keeps it: memory and
    /// file never disagree, even when the write fails.
    fn update<T>(
        &self,
        change: impl FnOnce(&mut leases::LeaseBook) -> Result<T, NetworkError>,
    ) -> Result<T, NetworkError> {
        let mut book = self.book();
        let mut next = book.clone();
        let out = change(&mut next)?;
        self.save(&next)?;
        let (before, after) = (named(&book), named(&next));
        *book = next;
        if let Some(names) = &self.names
            && before != after
            && let Err(e) = names.host.names(&after)
        {
            tracing::warn!(error = %error_chain(&e), "could not give the host the machine names");
        }
        Ok(out)
    }

    fn lease_for(&self, ip: Ipv4Addr) -> Lease {
        Lease {
            ip,
            prefix: self.subnet.prefix(),
            mac: mac_for(ip),
            gateway: self.subnet.gateway(),
        }
    }

    /// The machine's lease, taking the lowest free address when it has none. Idempotent: a
    /// machine keeps its address until [`Network::release`].
    pub fn lease(&self, machine: &str) -> Result<Lease, NetworkError> {
        if let Some(ip) = self.book().get(machine) {
            return Ok(self.lease_for(ip));
        }
        let ip = self.update(|book| {
            book.lease(machine)
                .map_err(|source| NetworkError::Exhausted {
                    machine: machine.to_string(),
                    source,
                })
        })?;
        Ok(self.lease_for(ip))
    }

    /// [`Network::lease`] for a machine of `owner`, which decides the machines it shares its
    /// segment of the bridge with (see [`NatRules`]).
    pub fn lease_owned(&self, machine: &str, owner: u32) -> Result<Lease, NetworkError> {
        let lease = self.lease(machine)?;
        if self.book().owner(machine) != Some(owner) {
            self.update(|book| {
                book.set_owner(machine, owner);
                Ok(())
            })?;
        }
        Ok(lease)
    }

    /// The machine's lease, if it has one.
    pub fn lease_of(&self, machine: &str) -> Option<Lease> {
        self.book().get(machine).map(|ip| self.lease_for(ip))
    }

    /// Frees the machine's address (at rm); returns the lease it held.
    pub fn release(&self, machine: &str) -> Result<Option<Lease>, NetworkError> {
        if self.book().get(machine).is_none() {
            return Ok(None);
        }
        let ip = self.update(|book| Ok(book.release(machine)))?;
        Ok(ip.map(|ip| self.lease_for(ip)))
    }

    /// Names of the machines holding leases.
    pub fn leased(&self) -> Vec<String> {
        self.book().names().map(str::to_string).collect()
    }

    /// The guest side of the machine's network, for the agent's boot config (made at each
    /// boot, so a guest from before is given its nameserver anew). The one nameserver is the
    /// gateway: the responder answers the machine names there and relays the rest to the
    /// host's resolvers, loopback ones included.
    pub fn guest_config(&self, machine: &str) -> Result<NetConfig, NetworkError> {
        let lease = self
            .lease_of(machine)
            .ok_or_else(|| NetworkError::NotLeased(machine.to_string()))?;
        Ok(NetConfig {
            interface: GUEST_INTERFACE.into(),
            address_cidr: lease.cidr(),
            gateway: lease.gateway.to_string(),
            nameservers: vec![lease.gateway.to_string()],
        })
    }

    /// Makes sure the bridge exists with the gateway address and is up. Fails, changing
    /// nothing, when the subnet overlaps a host route or the name is another kind of link.
    pub async fn ensure_bridge(&self) -> Result<(), NetworkError> {
        let _host = self.host_lock.lock().await;
        self.ensure_bridge_locked().await
    }

    async fn ensure_bridge_locked(&self) -> Result<(), NetworkError> {
        let host = &*self.host;
        let existing = host
            .links()
            .await?
            .into_iter()
            .find(|l| l.name == self.bridge);
        if let Some(link) = &existing
            && link.kind.as_deref() != Some("bridge")
        {
            return Err(NetworkError::BridgeNameTaken {
                bridge: self.bridge.clone(),
                kind: link.kind.clone().unwrap_or_else(|| "device".into()),
            });
        }
        for route in host.ipv4_routes().await? {
            // The default route overlaps everything and leads off the host: not a conflict.
            if route.prefix == 0 || route.device.as_deref() == Some(self.bridge.as_str()) {
                continue;
            }
            if self.subnet.overlaps(route.destination, route.prefix) {
                let via = route
                    .device
                    .map(|d| format!(" (device {d})"))
                    .unwrap_or_default();
                return Err(NetworkError::Overlap {
                    subnet: self.subnet,
                    route: format!("{}/{}{via}", route.destination, route.prefix),
                });
            }
        }
        let created = existing.is_none();
        if created {
            let [_, b, c, d] = self.gateway().octets();
            host.create_bridge(&self.bridge, [0x52, 0x54, 0x00, b, c, d])
                .await?;
        }
        let configure = async {
            let gateway = (self.gateway(), self.subnet.prefix());
            if !host.ipv4_addresses(&self.bridge).await?.contains(&gateway) {
                host.add_ipv4_address(&self.bridge, gateway.0, gateway.1)
                    .await?;
            }
            host.set_up(&self.bridge).await
        };
        if let Err(e) = configure.await {
            if created && let Err(undo) = host.delete_link(&self.bridge).await {
                tracing::warn!(bridge = %self.bridge, error = %undo, "could not delete the half-made bridge");
            }
            return Err(e.into());
        }
        self.listen_for_names().await;
        Ok(())
    }

    async fn our_taps(&self) -> Result<Vec<LinkInfo>, NetworkError> {
        Ok(self
            .host
            .links()
            .await?
            .into_iter()
            .filter(|l| l.name.starts_with(TAP_PREFIX))
            .collect())
    }

    /// The rules for the taps that exist now: each tap named after a leased machine is that
    /// machine's port; a tap of ours that no lease names gets none (it may send nothing).
    async fn rules(&self) -> Result<NatRules, NetworkError> {
        let taps: HashSet<String> = self.our_taps().await?.into_iter().map(|t| t.name).collect();
        let book = self.book();
        let mut ports: Vec<Port> = book
            .names()
            .filter_map(|name| {
                let tap = tap_name(name);
                let ip = book.get(name)?;
                taps.contains(&tap).then(|| Port {
                    tap,
                    mac: mac_for(ip),
                    ip,
                    owner: book.owner(name),
                })
            })
            .collect();
        ports.sort_by(|a, b| a.tap.cmp(&b.tap));
        Ok(NatRules {
            subnet: self.subnet,
            bridge: self.bridge.clone(),
            ports,
        })
    }

    /// NAT and isolation rules in place for the taps that exist now, and forwarding on; the
    /// previous forwarding value is saved in the lease file before it is changed, so even a
    /// restarted service restores it.
    async fn ensure_egress_locked(&self) -> Result<(), NetworkError> {
        let rules = self.rules().await?;
        self.host.set_nat(Some(&rules)).await?;
        if !self.host.ip_forward()? {
            let newly_saved = self.update(|book| {
                let newly = book.saved_ip_forward.is_none();
                book.saved_ip_forward.get_or_insert(false);
                Ok(newly)
            })?;
            if let Err(e) = self.host.set_ip_forward(true) {
                if newly_saved {
                    self.update(|book| {
                        book.saved_ip_forward = None;
                        Ok(())
                    })?;
                }
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// Removes our NAT table and restores forwarding; tries both even when one fails.
    async fn teardown_egress_locked(&self) -> Result<(), NetworkError> {
        let nat = self.host.set_nat(None).await;
        let saved = self.book().saved_ip_forward;
        if let Some(previous) = saved {
            self.host.set_ip_forward(previous)?;
            self.update(|book| {
                book.saved_ip_forward = None;
                Ok(())
            })?;
        }
        Ok(nat?)
    }

    /// Connects a machine about to boot: bridge, NAT and forwarding in place, its tap created
    /// as a port of the bridge and up. Returns the tap name for QEMU's
    /// `-netdev tap,ifname=TAP,script=no,downscript=no`. On failure nothing of this call
    /// remains but the bridge.
    pub async fn attach(&self, machine: &str) -> Result<String, NetworkError> {
        let _host = self.host_lock.lock().await;
        self.ensure_bridge_locked().await?;
        let tap = tap_name(machine);
        let taps = self.our_taps().await?;
        let others = taps.iter().any(|t| t.name != tap);
        let exists = taps.iter().any(|t| t.name == tap);
        let connect = async {
            if !exists {
                self.host.create_tap(&tap).await?;
            }
            // The rules know the new tap before it joins the bridge: it never sends unchecked.
            self.ensure_egress_locked().await?;
            self.host.set_controller(&tap, &self.bridge).await?;
            self.host.set_up(&tap).await?;
            Ok::<_, NetworkError>(())
        };
        if let Err(e) = connect.await {
            if let Err(undo) = self.host.delete_link(&tap).await {
                tracing::warn!(%tap, error = %undo, "could not delete the half-made tap");
            }
            if !others && let Err(undo) = self.teardown_egress_locked().await {
                tracing::warn!(error = %undo, "could not undo NAT and forwarding");
            }
            return Err(e);
        }
        Ok(tap)
    }

    /// Disconnects a machine that stopped: deletes its tap; when no tap is left, removes the
    /// NAT table and restores forwarding (the bridge stays). Idempotent.
    pub async fn detach(&self, machine: &str) -> Result<(), NetworkError> {
        let _host = self.host_lock.lock().await;
        self.host.delete_link(&tap_name(machine)).await?;
        if self.our_taps().await?.is_empty() {
            self.teardown_egress_locked().await?;
        } else {
            let rules = self.rules().await?;
            self.host.set_nat(Some(&rules)).await?;
        }
        Ok(())
    }

    /// Startup cleanup: frees the leases of machines not in `known`, deletes our taps that
    /// belong to no machine in `running`, and then either restores the host (no tap left) or
    /// makes sure the remaining taps are bridged with NAT and forwarding on.
    pub async fn reconcile(
        &self,
        known: &[String],
        running: &[String],
    ) -> Result<Reconciled, NetworkError> {
        let _host = self.host_lock.lock().await;
        let known: HashSet<&str> = known.iter().map(String::as_str).collect();
        let gone: Vec<String> = self
            .book()
            .names()
            .filter(|n| !known.contains(n))
            .map(str::to_string)
            .collect();
        if !gone.is_empty() {
            self.update(|book| {
                for name in &gone {
                    book.release(name);
                }
                Ok(())
            })?;
        }
        let wanted: HashSet<String> = running.iter().map(|m| tap_name(m)).collect();
        let mut removed_taps = Vec::new();
        for tap in self.our_taps().await? {
            if !wanted.contains(&tap.name) {
                self.host.delete_link(&tap.name).await?;
                removed_taps.push(tap.name);
            }
        }
        let remaining = self.our_taps().await?;
        if remaining.is_empty() {
            self.teardown_egress_locked().await?;
        } else {
            self.ensure_bridge_locked().await?;
            self.ensure_egress_locked().await?;
            for tap in remaining {
                if tap.controller.as_deref() != Some(self.bridge.as_str()) {
                    self.host.set_controller(&tap.name, &self.bridge).await?;
                }
                if !tap.up {
                    self.host.set_up(&tap.name).await?;
                }
            }
        }
        for name in &gone {
            tracing::info!(machine = %name, "released the lease of a machine that no longer exists");
        }
        for tap in &removed_taps {
            tracing::info!(%tap, "deleted a tap no running machine owns");
        }
        Ok(Reconciled {
            released: gone,
            removed_taps,
        })
    }
}
