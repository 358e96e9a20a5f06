//! The lease book: which machine holds which address of the subnet. Invariant: no address is
//! held twice, and every held address is a machine address of the subnet (never its network,
//! gateway or broadcast address). Pure data; `super::Network` persists it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::subnet::Subnet;

/// The subnet has no free machine address left.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no free address left in {subnet} ({held} machines hold leases)")]
pub struct Exhausted {
    pub subnet: Subnet,
    pub held: usize,
}

/// The MAC address of the machine holding `ip`: QEMU's locally administered prefix 52:54:00
/// and the low three bytes of the address, so it is unique within the subnet and a later
/// machine on a reused address answers with the same MAC (neighbour caches stay right).
pub fn mac_for(ip: Ipv4Addr) -> String {
    let [_, b, c, d] = ip.octets();
    format!("52:54:00:{b:02x}:{c:02x}:{d:02x}")
}

/// The lease file, `<root>/network/leases.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseFile {
    pub version: u32,
    /// The subnet the leases were taken from.
    pub subnet: String,
    pub leases: BTreeMap<String, StoredLease>,
    /// `net.ipv4.ip_forward` as it was before the service enabled it; present while the
    /// service holds it enabled, so a restarted service can still restore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved_ip_forward: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredLease {
    pub ip: Ipv4Addr,
    pub mac: String,
    /// The uid owning the machine (absent in files of services before isolation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<u32>,
}

pub const FILE_VERSION: u32 = 1;

/// Leases in memory.
#[derive(Debug, Clone)]
pub struct LeaseBook {
    subnet: Subnet,
    by_name: BTreeMap<String, Ipv4Addr>,
    held: BTreeSet<Ipv4Addr>,
    /// Each machine's owner, where known.
    owners: BTreeMap<String, u32>,
    pub saved_ip_forward: Option<bool>,
}

impl LeaseBook {
    pub fn new(subnet: Subnet) -> Self {
        Self {
            subnet,
            by_name: BTreeMap::new(),
            held: BTreeSet::new(),
            owners: BTreeMap::new(),
            saved_ip_forward: None,
        }
    }

    /// Rebuilds the book from its file. Leases that do not fit `subnet` (the configured subnet
    /// changed, or the file was edited) are left out and returned, so the caller can say so;
    /// those machines get a new address at their next lease.
    pub fn from_file(subnet: Subnet, file: LeaseFile) -> (Self, Vec<(String, Ipv4Addr)>) {
        let mut book = Self::new(subnet);
        book.saved_ip_forward = file.saved_ip_forward;
        let mut dropped = Vec::new();
        for (name, lease) in file.leases {
            if subnet.is_machine_address(lease.ip) && book.held.insert(lease.ip) {
                if let Some(owner) = lease.owner {
                    book.owners.insert(name.clone(), owner);
                }
                book.by_name.insert(name, lease.ip);
            } else {
                dropped.push((name, lease.ip));
            }
        }
        (book, dropped)
    }

    pub fn to_file(&self) -> LeaseFile {
        LeaseFile {
            version: FILE_VERSION,
            subnet: self.subnet.to_string(),
            leases: self
                .by_name
                .iter()
                .map(|(name, ip)| {
                    (
                        name.clone(),
                        StoredLease {
                            ip: *ip,
                            mac: mac_for(*ip),
                            owner: self.owners.get(name).copied(),
                        },
                    )
                })
                .collect(),
            saved_ip_forward: self.saved_ip_forward,
        }
    }

    /// The address of `name`, leasing the lowest free one when it has none.
    pub fn lease(&mut self, name: &str) -> Result<Ipv4Addr, Exhausted> {
        if let Some(ip) = self.by_name.get(name) {
            return Ok(*ip);
        }
        let ip = self
            .subnet
            .machine_addresses()
            .find(|ip| !self.held.contains(ip))
            .ok_or(Exhausted {
                subnet: self.subnet,
                held: self.held.len(),
            })?;
        self.held.insert(ip);
        self.by_name.insert(name.to_string(), ip);
        Ok(ip)
    }

    /// Records who owns the machine `name`.
    pub fn set_owner(&mut self, name: &str, owner: u32) {
        self.owners.insert(name.to_string(), owner);
    }

    pub fn owner(&self, name: &str) -> Option<u32> {
        self.owners.get(name).copied()
    }

    /// Frees the address of `name`; returns it when there was one.
    pub fn release(&mut self, name: &str) -> Option<Ipv4Addr> {
        self.owners.remove(name);
        let ip = self.by_name.remove(name)?;
        self.held.remove(&ip);
        Some(ip)
    }

    pub fn get(&self, name: &str) -> Option<Ipv4Addr> {
        self.by_name.get(name).copied()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn subnet(s: &str) -> Subnet {
        s.parse().unwrap()
    }

    #[test]
    fn lease_is_sticky_and_lowest_free_first() {
        let mut b = LeaseBook::new(subnet("192.168.64.0/24"));
        let a = b.lease("a").unwrap();
        assert_eq!(a, Ipv4Addr::new(192, 168, 64, 2));
        assert_eq!(
            b.lease("a").unwrap(),
            a,
            "a second lease returns the same address"
        );
        let c = b.lease("c").unwrap();
        assert_eq!(c, Ipv4Addr::new(192, 168, 64, 3));
        assert_eq!(b.release("a"), Some(a));
        assert_eq!(b.release("a"), None);
        assert_eq!(b.lease("d").unwrap(), a, "a freed address is reused");
    }

    #[test]
    fn exhaustion_is_an_error_and_release_recovers() {
        let mut b = LeaseBook::new(subnet("10.1.2.0/29"));
        for i in 0..5 {
            b.lease(&format!("m{i}")).unwrap();
        }
        let e = b.lease("one-too-many").unwrap_err();
        assert_eq!(e.held, 5);
        assert!(e.to_string().contains("10.1.2.0/29"));
        b.release("m3").unwrap();
        assert_eq!(b.lease("one-too-many").unwrap(), Ipv4Addr::new(10, 1, 2, 5));
    }

    #[test]
    fn file_round_trip_drops_leases_outside_the_subnet_and_duplicates() {
        let mut b = LeaseBook::new(subnet("192.168.64.0/24"));
        b.lease("a").unwrap();
        b.lease("b").unwrap();
        b.saved_ip_forward = Some(false);
        let mut file = b.to_file();
        assert_eq!(file.leases["a"].mac, "52:54:00:a8:40:02");
        let (again, dropped) = LeaseBook::from_file(subnet("192.168.64.0/24"), file.clone());
        assert!(dropped.is_empty());
        assert_eq!(again.get("b"), b.get("b"));
        assert_eq!(again.saved_ip_forward, Some(false));

        file.leases.get_mut("b").unwrap().ip = Ipv4Addr::new(192, 168, 64, 2);
        file.leases.insert(
            "gw".into(),
            StoredLease {
                ip: Ipv4Addr::new(192, 168, 64, 1),
                mac: String::new(),
                owner: None,
            },
        );
        let (again, dropped) = LeaseBook::from_file(subnet("192.168.64.0/24"), file.clone());
        assert_eq!(again.len(), 1);
        assert_eq!(dropped.len(), 2);

        let (moved, dropped) = LeaseBook::from_file(subnet("10.0.0.0/24"), b.to_file());
        assert!(moved.is_empty());
        assert_eq!(dropped.len(), 2);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Lease(u8),
        Release(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..40).prop_map(Op::Lease),
            (0u8..40).prop_map(Op::Release)
        ]
    }

    proptest! {
        /// Leases and releases in any order never hand out an address twice, never a
        /// reserved one, and fail exactly when the subnet is full.
        #[test]
        fn never_hands_out_an_address_twice(ops in proptest::collection::vec(op(), 1..300)) {
            let s = subnet("172.20.0.0/27"); // 29 machine addresses for 40 names
            let mut b = LeaseBook::new(s);
            let mut model: HashMap<String, Ipv4Addr> = HashMap::new();
            for op in ops {
                match op {
                    Op::Lease(n) => {
                        let name = format!("m{n}");
                        match b.lease(&name) {
                            Ok(ip) => {
                                prop_assert!(s.is_machine_address(ip));
                                if let Some(old) = model.get(&name) {
                                    prop_assert_eq!(*old, ip);
                                } else {
                                    prop_assert!(!model.values().any(|v| *v == ip));
                                    model.insert(name, ip);
                                }
                            }
                            Err(_) => {
                                prop_assert!(!model.contains_key(&name));
                                prop_assert_eq!(model.len(), s.capacity());
                            }
                        }
                    }
                    Op::Release(n) => {
                        let name = format!("m{n}");
                        prop_assert_eq!(b.release(&name), model.remove(&name));
                    }
                }
                prop_assert_eq!(b.len(), model.len());
            }
            let (reloaded, dropped) = LeaseBook::from_file(s, b.to_file());
            prop_assert!(dropped.is_empty());
            for (name, ip) in &model {
                prop_assert_eq!(reloaded.get(name), Some(*ip));
            }
        }
    }
}
