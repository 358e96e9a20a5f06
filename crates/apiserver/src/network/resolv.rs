//! The nameservers a guest can use: the host's resolvers from resolv.conf, without loopback
//! stubs (127.0.0.53 of systemd-resolved, a local dnsmasq) that the guest cannot reach, and
//! without IPv6 ones (the machine network is IPv4 only).

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

/// Where systemd-resolved lists the upstream servers behind its 127.0.0.53 stub.
pub const RESOLVED_UPSTREAM: &str = "/run/systemd/resolve/resolv.conf";

/// The usable IPv4 nameservers of a resolv.conf text, in order, without duplicates.
pub fn usable_nameservers(resolv_conf: &str) -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    for line in resolv_conf.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(Ok(IpAddr::V4(ip))) = words.next().map(str::parse::<IpAddr>) else {
            continue;
        };
        if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast() {
            continue;
        }
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

/// The usable nameservers of the host: from `primary` (normally /etc/resolv.conf), else from
/// `fallback` (systemd-resolved's upstream list, when `primary` only names its stub).
pub fn host_nameservers(primary: &Path, fallback: &Path) -> Vec<Ipv4Addr> {
    [primary, fallback]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|text| usable_nameservers(&text))
        .find(|v| !v.is_empty())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_reachable_ipv4_servers_only() {
        let text = "# generated\nsearch example.internal\nnameserver 127.0.0.53\n\
                    nameserver 10.255.255.53\nnameserver ::1\nnameserver 2001:db8::1\n\
                    nameserver 10.255.255.53\n  nameserver   192.0.2.7  # comment\n\
                    nameserver bogus\noptions edns0\n";
        assert_eq!(
            usable_nameservers(text),
            [Ipv4Addr::new(10, 255, 255, 53), Ipv4Addr::new(192, 0, 2, 7)]
        );
    }

    #[test]
    fn falls_back_to_the_resolved_upstreams_behind_a_stub() {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("resolv.conf");
        let run = dir.path().join("upstream.conf");
        std::fs::write(&etc, "nameserver 127.0.0.53\n").unwrap();
        std::fs::write(&run, "nameserver 198.51.100.1\n").unwrap();
        assert_eq!(
            host_nameservers(&etc, &run),
            [Ipv4Addr::new(198, 51, 100, 1)]
        );
        std::fs::remove_file(&run).unwrap();
        assert!(host_nameservers(&etc, &run).is_empty());
    }
}
