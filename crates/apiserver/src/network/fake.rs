//! A recording fake of the host network for unit tests: links, addresses and routes kept in
//! memory with the kernel's main rules (an address brings its prefix route; deleting a link
//! takes its addresses, routes and bridge ports with it), and injectable failures.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;

use super::host::{HostError, HostNet, LinkInfo, NatRules, RouteInfo};

#[derive(Debug, Default)]
pub struct FakeState {
    pub links: BTreeMap<String, LinkInfo>,
    pub addresses: BTreeMap<String, Vec<(Ipv4Addr, u8)>>,
    /// Routes not tied to an address (a default route, a VPN's routes).
    pub static_routes: Vec<RouteInfo>,
    pub nat: Option<NatRules>,
    pub ip_forward: bool,
    /// Operations that fail (by method name) while listed.
    pub failing: BTreeSet<&'static str>,
    /// Every mutating call, in order.
    pub calls: Vec<String>,
}

#[derive(Debug, Default)]
pub struct FakeHost {
    state: Mutex<FakeState>,
}

impl FakeHost {
    pub fn state(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().unwrap()
    }

    pub fn add_link(&self, name: &str, kind: Option<&str>) {
        self.state().links.insert(
            name.into(),
            LinkInfo {
                name: name.into(),
                kind: kind.map(str::to_string),
                controller: None,
                up: true,
            },
        );
    }

    pub fn taps(&self) -> Vec<String> {
        self.state()
            .links
            .keys()
            .filter(|n| n.starts_with(super::TAP_PREFIX))
            .cloned()
            .collect()
    }
}

impl FakeState {
    fn check(&mut self, op: &'static str, call: String) -> Result<(), HostError> {
        self.calls.push(call);
        self.fail_if(op)
    }

    fn fail_if(&self, op: &'static str) -> Result<(), HostError> {
        if self.failing.contains(op) {
            return Err(HostError::Io {
                action: op.into(),
                source: std::io::Error::other("injected failure"),
            });
        }
        Ok(())
    }

    fn link(&mut self, name: &str) -> Result<&mut LinkInfo, HostError> {
        self.links
            .get_mut(name)
            .ok_or_else(|| HostError::NoSuchLink(name.into()))
    }
}

fn network_of(ip: Ipv4Addr, prefix: u8) -> Ipv4Addr {
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    Ipv4Addr::from(u32::from(ip) & mask)
}

#[async_trait]
impl HostNet for FakeHost {
    async fn links(&self) -> Result<Vec<LinkInfo>, HostError> {
        let s = self.state();
        s.fail_if("links")?;
        Ok(s.links.values().cloned().collect())
    }

    async fn create_bridge(&self, name: &str, _mac: [u8; 6]) -> Result<(), HostError> {
        let mut s = self.state();
        s.check("create_bridge", format!("create_bridge {name}"))?;
        s.links.insert(
            name.into(),
            LinkInfo {
                name: name.into(),
                kind: Some("bridge".into()),
                controller: None,
                up: false,
            },
        );
        Ok(())
    }

    async fn ipv4_addresses(&self, link: &str) -> Result<Vec<(Ipv4Addr, u8)>, HostError> {
        let mut s = self.state();
        s.link(link)?;
        Ok(s.addresses.get(link).cloned().unwrap_or_default())
    }

    async fn add_ipv4_address(
        &self,
        link: &str,
        ip: Ipv4Addr,
        prefix: u8,
    ) -> Result<(), HostError> {
        let mut s = self.state();
        s.check(
            "add_ipv4_address",
            format!("add_ipv4_address {link} {ip}/{prefix}"),
        )?;
        s.link(link)?;
        s.addresses
            .entry(link.into())
            .or_default()
            .push((ip, prefix));
        Ok(())
    }

    async fn ipv4_routes(&self) -> Result<Vec<RouteInfo>, HostError> {
        let s = self.state();
        let mut routes = s.static_routes.clone();
        for (link, addrs) in &s.addresses {
            for (ip, prefix) in addrs {
                routes.push(RouteInfo {
                    destination: network_of(*ip, *prefix),
                    prefix: *prefix,
                    device: Some(link.clone()),
                });
            }
        }
        Ok(routes)
    }

    async fn set_up(&self, link: &str) -> Result<(), HostError> {
        let mut s = self.state();
        s.check("set_up", format!("set_up {link}"))?;
        s.link(link)?.up = true;
        Ok(())
    }

    async fn create_tap(&self, name: &str) -> Result<(), HostError> {
        let mut s = self.state();
        s.check("create_tap", format!("create_tap {name}"))?;
        s.links.insert(
            name.into(),
            LinkInfo {
                name: name.into(),
                kind: Some("tun".into()),
                controller: None,
                up: false,
            },
        );
        Ok(())
    }

    async fn set_controller(&self, link: &str, bridge: &str) -> Result<(), HostError> {
        let mut s = self.state();
        s.check("set_controller", format!("set_controller {link} {bridge}"))?;
        s.link(bridge)?;
        s.link(link)?.controller = Some(bridge.into());
        Ok(())
    }

    async fn delete_link(&self, name: &str) -> Result<(), HostError> {
        let mut s = self.state();
        s.check("delete_link", format!("delete_link {name}"))?;
        s.links.remove(name);
        s.addresses.remove(name);
        s.static_routes
            .retain(|r| r.device.as_deref() != Some(name));
        for l in s.links.values_mut() {
            if l.controller.as_deref() == Some(name) {
                l.controller = None;
            }
        }
        Ok(())
    }

    async fn set_nat(&self, rules: Option<&NatRules>) -> Result<(), HostError> {
        let mut s = self.state();
        s.check("set_nat", format!("set_nat {}", rules.is_some()))?;
        s.nat = rules.cloned();
        Ok(())
    }

    fn ip_forward(&self) -> Result<bool, HostError> {
        Ok(self.state().ip_forward)
    }

    fn set_ip_forward(&self, on: bool) -> Result<(), HostError> {
        let mut s = self.state();
        s.check("set_ip_forward", format!("set_ip_forward {on}"))?;
        s.ip_forward = on;
        Ok(())
    }
}
