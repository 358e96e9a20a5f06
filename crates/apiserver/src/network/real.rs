//! The real host: links, addresses and routes through rtnetlink; taps through `super::tap`;
//! the NAT table through the `nft` command fed a script on stdin (one transaction: nftables
//! applies a script atomically, and the CLI is the interface the nftables project keeps
//! stable, where the netlink crates for nf_tables are young or wrap libnftnl);
//! `net.ipv4.ip_forward` through /proc/sys, which reflects the caller's network namespace.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::Stdio;

use async_trait::async_trait;
use futures::TryStreamExt;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{
    LinkAttribute, LinkFlags, LinkInfo as NlLinkInfo, LinkMessage,
};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
use rtnetlink::{Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, RouteMessageBuilder};
use tokio::io::AsyncWriteExt;

use super::TAP_PREFIX;
use super::host::{HostError, HostNet, LinkInfo, NatRules, RouteInfo};
use super::tap;

/// The nftables table the service owns, created and deleted as a unit.
pub const NFT_TABLE: &str = "container";
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
const RT_TABLE_LOCAL: u32 = 255;

/// The host's network stack, in the network namespace the service started in.
#[derive(Clone)]
pub struct RealHost {
    handle: Handle,
}

impl std::fmt::Debug for RealHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RealHost").finish_non_exhaustive()
    }
}

impl RealHost {
    /// Opens a netlink connection, driven by a task on the current tokio runtime.
    pub fn new() -> Result<Self, HostError> {
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(|source| HostError::Io {
                action: "opening a netlink socket".into(),
                source,
            })?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    async fn link_names(&self) -> Result<HashMap<u32, String>, HostError> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl("listing links".into(), e))?;
        Ok(msgs
            .iter()
            .filter_map(|m| Some((m.header.index, link_name(m)?)))
            .collect())
    }

    async fn index(&self, name: &str) -> Result<u32, HostError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(Some(msg)) => Ok(msg.header.index),
            Ok(None) => Err(HostError::NoSuchLink(name.into())),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Err(HostError::NoSuchLink(name.into())),
            Err(source) => Err(nl(format!("looking up link `{name}`"), source)),
        }
    }
}

fn nl(action: String, source: rtnetlink::Error) -> HostError {
    HostError::Netlink { action, source }
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

fn link_name(msg: &LinkMessage) -> Option<String> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

/// The nft script that replaces our tables (declaring each first makes its delete succeed
/// when it does not exist yet; the whole script is one transaction, so the host never runs
/// with half a rule set).
///
/// Isolation lives in a `bridge` family table, which sees frames as the bridge switches
/// them: `prerouting` drops what a tap sends from another MAC or address than its machine's
/// (ARP included) and anything but IPv4 and ARP, before the frame reaches the host, the
/// NAT or another port; `forward` drops frames between two taps whose machines do not
/// share an owner. The host's own traffic to machines passes neither hook's drops.
pub fn nat_script(rules: Option<&NatRules>) -> String {
    let mut s = format!(
        "table ip {NFT_TABLE}\ndelete table ip {NFT_TABLE}\n\
         table bridge {NFT_TABLE}\ndelete table bridge {NFT_TABLE}\n"
    );
    let Some(r) = rules else {
        return s;
    };
    s.push_str(&format!(
        "table ip {NFT_TABLE} {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tip saddr {subnet} oifname != \"{bridge}\" masquerade\n\
         \t}}\n\
         }}\n",
        subnet = r.subnet,
        bridge = r.bridge,
    ));
    let pairs: Vec<String> = r
        .ports
        .iter()
        .flat_map(|a| r.ports.iter().map(move |b| (a, b)))
        .filter(|(a, b)| a.tap != b.tap && a.owner.is_some() && a.owner == b.owner)
        .map(|(a, b)| format!("\"{}\" . \"{}\"", a.tap, b.tap))
        .collect();
    s.push_str(&format!(
        "table bridge {NFT_TABLE} {{\n\tset same_owner {{\n\t\ttype ifname . ifname\n"
    ));
    if !pairs.is_empty() {
        s.push_str(&format!("\t\telements = {{ {} }}\n", pairs.join(", ")));
    }
    s.push_str(
        "\t}\n\tchain prerouting {\n\
         \t\ttype filter hook prerouting priority -200; policy accept;\n",
    );
    for p in &r.ports {
        let tap = &p.tap;
        s.push_str(&format!(
            "\t\tiifname \"{tap}\" ether saddr != {mac} drop\n\
             \t\tiifname \"{tap}\" ether type arp arp saddr ip != {ip} drop\n\
             \t\tiifname \"{tap}\" ether type ip ip saddr != {ip} drop\n\
             \t\tiifname \"{tap}\" ether type != {{ ip, arp }} drop\n\
             \t\tiifname \"{tap}\" accept\n",
            mac = p.mac,
            ip = p.ip,
        ));
    }
    s.push_str(&format!(
        "\t\tiifname \"{TAP_PREFIX}*\" drop\n\t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority 0; policy accept;\n\
         \t\tiifname \"{TAP_PREFIX}*\" oifname \"{TAP_PREFIX}*\" iifname . oifname != @same_owner drop\n\
         \t}}\n}}\n"
    ));
    s
}

fn find_nft() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join("nft"))
        .find(|p| p.is_file())
}

#[async_trait]
impl HostNet for RealHost {
    async fn links(&self) -> Result<Vec<LinkInfo>, HostError> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl("listing links".into(), e))?;
        let names: HashMap<u32, String> = msgs
            .iter()
            .filter_map(|m| Some((m.header.index, link_name(m)?)))
            .collect();
        Ok(msgs
            .iter()
            .filter_map(|m| {
                let name = link_name(m)?;
                let mut kind = None;
                let mut controller = None;
                for a in &m.attributes {
                    match a {
                        LinkAttribute::LinkInfo(infos) => {
                            kind = infos.iter().find_map(|i| match i {
                                NlLinkInfo::Kind(k) => Some(k.to_string()),
                                _ => None,
                            });
                        }
                        LinkAttribute::Controller(i) => controller = names.get(i).cloned(),
                        _ => {}
                    }
                }
                Some(LinkInfo {
                    name,
                    kind,
                    controller,
                    up: m.header.flags.contains(LinkFlags::Up),
                })
            })
            .collect())
    }

    async fn create_bridge(&self, name: &str, mac: [u8; 6]) -> Result<(), HostError> {
        let msg = LinkMessageBuilder::<LinkBridge>::new(name)
            .address(mac.to_vec())
            .build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(|e| nl(format!("creating bridge `{name}`"), e))
    }

    async fn ipv4_addresses(&self, link: &str) -> Result<Vec<(Ipv4Addr, u8)>, HostError> {
        let index = self.index(link).await?;
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl(format!("listing the addresses of `{link}`"), e))?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.family == AddressFamily::Inet)
            .filter_map(|m| {
                let local = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                    _ => None,
                });
                let address = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
                    _ => None,
                });
                Some((local.or(address)?, m.header.prefix_len))
            })
            .collect())
    }

    async fn add_ipv4_address(
        &self,
        link: &str,
        ip: Ipv4Addr,
        prefix: u8,
    ) -> Result<(), HostError> {
        let index = self.index(link).await?;
        self.handle
            .address()
            .add(index, IpAddr::V4(ip), prefix)
            .execute()
            .await
            .map_err(|e| nl(format!("adding {ip}/{prefix} to `{link}`"), e))
    }

    async fn ipv4_routes(&self) -> Result<Vec<RouteInfo>, HostError> {
        let dump = RouteMessageBuilder::<Ipv4Addr>::new().build();
        let msgs: Vec<_> = self
            .handle
            .route()
            .get(dump)
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl("listing IPv4 routes".into(), e))?;
        let by_index = self.link_names().await?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.address_family == AddressFamily::Inet)
            .filter(|m| {
                let table = m
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        RouteAttribute::Table(t) => Some(*t),
                        _ => None,
                    })
                    .unwrap_or(u32::from(m.header.table));
                table != RT_TABLE_LOCAL
            })
            .map(|m| {
                let destination = m
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(*ip),
                        _ => None,
                    })
                    .unwrap_or(Ipv4Addr::UNSPECIFIED);
                let device = m.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Oif(i) => by_index.get(i).cloned(),
                    _ => None,
                });
                RouteInfo {
                    destination,
                    prefix: m.header.destination_prefix_length,
                    device,
                }
            })
            .collect())
    }

    async fn set_up(&self, link: &str) -> Result<(), HostError> {
        let index = self.index(link).await?;
        self.handle
            .link()
            .change(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(|e| nl(format!("setting `{link}` up"), e))
    }

    async fn create_tap(&self, name: &str) -> Result<(), HostError> {
        let owned = name.to_string();
        tokio::task::spawn_blocking(move || tap::create_persistent_tap(&owned))
            .await
            .map_err(|e| HostError::Io {
                action: format!("creating tap `{name}`"),
                source: std::io::Error::other(e),
            })?
            .map_err(|source| HostError::Io {
                action: format!("creating tap `{name}` through /dev/net/tun"),
                source,
            })
    }

    async fn set_controller(&self, link: &str, bridge: &str) -> Result<(), HostError> {
        let index = self.index(link).await?;
        let bridge_index = self.index(bridge).await?;
        self.handle
            .link()
            .change(
                LinkUnspec::new_with_index(index)
                    .controller(bridge_index)
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| nl(format!("adding `{link}` to bridge `{bridge}`"), e))
    }

    async fn delete_link(&self, name: &str) -> Result<(), HostError> {
        let index = match self.index(name).await {
            Ok(i) => i,
            Err(HostError::NoSuchLink(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(()),
            Err(e) => Err(nl(format!("deleting link `{name}`"), e)),
        }
    }

    async fn set_nat(&self, rules: Option<&NatRules>) -> Result<(), HostError> {
        let nft = find_nft().ok_or(HostError::NftMissing)?;
        let io = |action: &str| {
            let action = action.to_string();
            move |source| HostError::Io { action, source }
        };
        let mut child = tokio::process::Command::new(&nft)
            .env_clear()
            .envs(crate::runtime::helpers::HELPER_ENV)
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io("running nft"))?;
        let script = nat_script(rules);
        let mut stdin = child.stdin.take().expect("stdin is piped");
        stdin
            .write_all(script.as_bytes())
            .await
            .map_err(io("writing the nft script"))?;
        drop(stdin);
        let out = child.wait_with_output().await.map_err(io("running nft"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(HostError::Nft {
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }

    fn ip_forward(&self) -> Result<bool, HostError> {
        let v = std::fs::read_to_string(IP_FORWARD).map_err(|source| HostError::Io {
            action: format!("reading {IP_FORWARD}"),
            source,
        })?;
        Ok(v.trim() != "0")
    }

    fn set_ip_forward(&self, on: bool) -> Result<(), HostError> {
        std::fs::write(IP_FORWARD, if on { "1\n" } else { "0\n" }).map_err(|source| HostError::Io {
            action: format!("writing {IP_FORWARD}"),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nat_script_replaces_or_deletes_the_table_as_a_unit() {
        let rules = NatRules {
            subnet: "192.168.64.0/24".parse().unwrap(),
            bridge: "container0".into(),
            ports: Vec::new(),
        };
        let s = nat_script(Some(&rules));
        assert!(s.starts_with("table ip container\ndelete table ip container\n"));
        assert!(s.contains("ip saddr 192.168.64.0/24 oifname != \"container0\" masquerade"));
        assert_eq!(
            nat_script(None),
            "table ip container\ndelete table ip container\n\
             table bridge container\ndelete table bridge container\n"
        );
    }

    #[test]
    fn each_tap_sends_as_its_machine_and_reaches_only_its_owners_machines() {
        use super::super::host::Port;
        let port = |tap: &str, last: u8, owner: Option<u32>| Port {
            tap: tap.into(),
            mac: format!("52:54:00:40:00:{last:02x}"),
            ip: Ipv4Addr::new(192, 168, 64, last),
            owner,
        };
        let rules = NatRules {
            subnet: "192.168.64.0/24".parse().unwrap(),
            bridge: "container0".into(),
            ports: vec![
                port("ctap-a1", 2, Some(1000)),
                port("ctap-a2", 3, Some(1000)),
                port("ctap-b1", 4, Some(1001)),
                port("ctap-x", 5, None),
            ],
        };
        let s = nat_script(Some(&rules));
        assert!(s.contains("delete table bridge container\n"));
        // Only the two machines of uid 1000 may talk, both ways.
        assert!(
            s.contains("elements = { \"ctap-a1\" . \"ctap-a2\", \"ctap-a2\" . \"ctap-a1\" }"),
            "{s}"
        );
        assert!(s.contains("iifname \"ctap-b1\" ether saddr != 52:54:00:40:00:04 drop"));
        assert!(s.contains("iifname \"ctap-b1\" ether type arp arp saddr ip != 192.168.64.4 drop"));
        assert!(s.contains("iifname \"ctap-b1\" ether type ip ip saddr != 192.168.64.4 drop"));
        assert!(
            s.contains("iifname \"ctap-*\" drop"),
            "unknown taps send nothing"
        );
        assert!(s.contains("iifname . oifname != @same_owner drop"));
        // Nobody shares an owner: the set is declared empty.
        let alone = NatRules {
            ports: vec![port("ctap-b1", 4, Some(1001))],
            ..rules
        };
        assert!(!nat_script(Some(&alone)).contains("elements"));
    }
}
