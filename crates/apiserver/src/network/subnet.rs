//! IPv4 subnets as the network module needs them: parsed strictly from config (a network
//! address, prefix 8 to 30), with the gateway at the first host address and the machines'
//! addresses between it and the broadcast address.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// Why a subnet string is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubnetError {
    #[error("`{0}` is not an IPv4 network in CIDR form (such as 192.168.64.0/24)")]
    NotCidr(String),
    #[error("the prefix of `{0}` must be between /8 and /30")]
    PrefixOutOfRange(String),
    #[error("`{given}` has host bits set; the network is {network}")]
    HostBitsSet { given: String, network: Subnet },
}

/// An IPv4 network: its address (host bits clear) and prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Subnet {
    network: Ipv4Addr,
    prefix: u8,
}

/// Shortest prefix accepted: machine MAC addresses are derived from the low three bytes of
/// the address, which are unique within a /8 or anything smaller.
pub const MIN_PREFIX: u8 = 8;
/// Longest prefix accepted: a /30 holds the gateway and one machine.
pub const MAX_PREFIX: u8 = 30;

impl Subnet {
    /// A subnet from a network address and prefix; `None` when host bits are set or the
    /// prefix is out of range.
    pub fn new(network: Ipv4Addr, prefix: u8) -> Option<Self> {
        if !(MIN_PREFIX..=MAX_PREFIX).contains(&prefix) {
            return None;
        }
        let s = Self { network, prefix };
        (u32::from(network) & !s.mask() == 0).then_some(s)
    }

    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    fn mask(&self) -> u32 {
        mask(self.prefix)
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !self.mask())
    }

    /// The host side of the bridge: the first host address.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// Addresses a machine may lease, lowest first: every host address but the gateway.
    pub fn machine_addresses(&self) -> impl Iterator<Item = Ipv4Addr> + use<> {
        let first = u32::from(self.network) + 2;
        let last = u32::from(self.broadcast()) - 1;
        (first..=last).map(Ipv4Addr::from)
    }

    /// How many machines the subnet holds.
    pub fn capacity(&self) -> usize {
        (1usize << (32 - self.prefix)) - 3
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network)
    }

    /// Whether `ip` is an address a machine may hold (not the network, gateway or broadcast).
    pub fn is_machine_address(&self, ip: Ipv4Addr) -> bool {
        self.contains(ip) && ip != self.network && ip != self.gateway() && ip != self.broadcast()
    }

    /// Whether the network `addr/prefix` (any prefix 0..=32) shares an address with this one.
    pub fn overlaps(&self, addr: Ipv4Addr, prefix: u8) -> bool {
        let shorter = self.prefix.min(prefix);
        let m = mask(shorter);
        u32::from(addr) & m == u32::from(self.network) & m
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for Subnet {
    type Err = SubnetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let not_cidr = || SubnetError::NotCidr(s.to_string());
        let (addr, prefix) = s.trim().split_once('/').ok_or_else(not_cidr)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| not_cidr())?;
        if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) || prefix.len() > 2 {
            return Err(not_cidr());
        }
        let prefix: u8 = prefix.parse().map_err(|_| not_cidr())?;
        if prefix > 32 {
            return Err(not_cidr());
        }
        if !(MIN_PREFIX..=MAX_PREFIX).contains(&prefix) {
            return Err(SubnetError::PrefixOutOfRange(s.to_string()));
        }
        let network = Ipv4Addr::from(u32::from(addr) & mask(prefix));
        Subnet::new(addr, prefix).ok_or_else(|| SubnetError::HostBitsSet {
            given: s.to_string(),
            network: Subnet { network, prefix },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_default_and_derives_its_addresses() {
        let s: Subnet = "192.168.64.0/24".parse().unwrap();
        assert_eq!(s.gateway(), Ipv4Addr::new(192, 168, 64, 1));
        assert_eq!(s.broadcast(), Ipv4Addr::new(192, 168, 64, 255));
        assert_eq!(s.capacity(), 253);
        let all: Vec<_> = s.machine_addresses().collect();
        assert_eq!(all.len(), 253);
        assert_eq!(all[0], Ipv4Addr::new(192, 168, 64, 2));
        assert_eq!(all[252], Ipv4Addr::new(192, 168, 64, 254));
        assert!(!s.is_machine_address(s.gateway()));
        assert!(!s.is_machine_address(s.network()));
        assert!(!s.is_machine_address(s.broadcast()));
        assert!(!s.is_machine_address(Ipv4Addr::new(192, 168, 65, 2)));
    }

    #[test]
    fn a_slash_30_holds_one_machine() {
        let s: Subnet = "10.0.0.4/30".parse().unwrap();
        assert_eq!(s.capacity(), 1);
        assert_eq!(
            s.machine_addresses().collect::<Vec<_>>(),
            [Ipv4Addr::new(10, 0, 0, 6)]
        );
    }

    #[test]
    fn rejects_what_is_not_a_usable_ipv4_network() {
        for bad in [
            "",
            "192.168.64.0",
            "192.168.64.0/",
            "fd00::/64",
            "192.168.64.0/33",
            "x/24",
            "192.168.64.0/+4",
        ] {
            assert!(
                matches!(bad.parse::<Subnet>(), Err(SubnetError::NotCidr(_))),
                "{bad}"
            );
        }
        for bad in [
            "192.168.64.0/31",
            "192.168.64.1/32",
            "10.0.0.0/7",
            "0.0.0.0/0",
        ] {
            assert!(
                matches!(bad.parse::<Subnet>(), Err(SubnetError::PrefixOutOfRange(_))),
                "{bad}"
            );
        }
        let e = "192.168.64.1/24".parse::<Subnet>().unwrap_err();
        assert!(e.to_string().contains("192.168.64.0/24"), "{e}");
    }

    #[test]
    fn overlap_is_symmetric_in_containment() {
        let s: Subnet = "192.168.64.0/24".parse().unwrap();
        assert!(s.overlaps(Ipv4Addr::new(192, 168, 0, 0), 16));
        assert!(s.overlaps(Ipv4Addr::new(192, 168, 64, 128), 25));
        assert!(s.overlaps(Ipv4Addr::new(192, 168, 64, 7), 32));
        assert!(!s.overlaps(Ipv4Addr::new(192, 168, 65, 0), 24));
        assert!(!s.overlaps(Ipv4Addr::new(10, 0, 0, 0), 8));
        assert!(s.overlaps(Ipv4Addr::UNSPECIFIED, 0));
    }
}
