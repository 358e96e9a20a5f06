//! The host side effects the network needs, behind one narrow trait: links, addresses and
//! routes (netlink), the NAT table (nftables) and `net.ipv4.ip_forward`. `super::real` is
//! the real host; unit tests pass a recording fake. Methods take link names, not indices,
//! so a caller never holds an index that a concurrent change could reuse.

use std::net::Ipv4Addr;

use async_trait::async_trait;

use super::subnet::Subnet;

/// What the network module needs to know about a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub name: String,
    /// The link kind (`bridge`, `tun`, `veth`...); `None` for physical devices and loopback.
    pub kind: Option<String>,
    /// The bridge it is a port of.
    pub controller: Option<String>,
    pub up: bool,
}

/// An IPv4 route of any table but `local`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteInfo {
    pub destination: Ipv4Addr,
    pub prefix: u8,
    /// The output device, when the route has one.
    pub device: Option<String>,
}

/// The service's rules on the host: masquerade for traffic from `subnet` leaving through
/// any link but `bridge`, and the isolation of the machines on the bridge: each tap may send
/// only from its machine's MAC and address, and frames pass between two taps only when
/// their machines have the same owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatRules {
    pub subnet: Subnet,
    pub bridge: String,
    /// The taps on the bridge, in name order; a tap of ours not listed here sends nothing.
    pub ports: Vec<Port>,
}

/// A machine's tap as the isolation rules see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    pub tap: String,
    pub mac: String,
    pub ip: std::net::Ipv4Addr,
    /// The machine's owner; a machine of unknown owner shares its segment with nobody.
    pub owner: Option<u32>,
}

/// A host operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("netlink: {action}")]
    Netlink {
        action: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{action}")]
    Io {
        action: String,
        #[source]
        source: std::io::Error,
    },
    #[error("link `{0}` does not exist")]
    NoSuchLink(String),
    #[error("nft is not installed: install the nftables package")]
    NftMissing,
    #[error("nft refused the rule set: {stderr}")]
    Nft { stderr: String },
}

/// The host's network configuration, as far as the network module touches it.
#[async_trait]
pub trait HostNet: Send + Sync + std::fmt::Debug {
    async fn links(&self) -> Result<Vec<LinkInfo>, HostError>;
    /// Creates a bridge, down, with a fixed MAC address (a bridge otherwise takes the lowest
    /// MAC of its ports, which changes as taps come and go and confuses guests' ARP caches).
    async fn create_bridge(&self, name: &str, mac: [u8; 6]) -> Result<(), HostError>;
    async fn ipv4_addresses(&self, link: &str) -> Result<Vec<(Ipv4Addr, u8)>, HostError>;
    async fn add_ipv4_address(&self, link: &str, ip: Ipv4Addr, prefix: u8)
    -> Result<(), HostError>;
    async fn ipv4_routes(&self) -> Result<Vec<RouteInfo>, HostError>;
    async fn set_up(&self, link: &str) -> Result<(), HostError>;
    /// Creates a persistent tap (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR) owned by root.
    async fn create_tap(&self, name: &str) -> Result<(), HostError>;
    async fn set_controller(&self, link: &str, bridge: &str) -> Result<(), HostError>;
    /// Deletes a link; a link that does not exist is not an error.
    async fn delete_link(&self, name: &str) -> Result<(), HostError>;
    /// `Some`: replaces our nftables table with these rules in one transaction; `None`:
    /// deletes the table if it exists.
    async fn set_nat(&self, rules: Option<&NatRules>) -> Result<(), HostError>;
    fn ip_forward(&self) -> Result<bool, HostError>;
    fn set_ip_forward(&self, on: bool) -> Result<(), HostError>;
}
