//! The host's resolvers, read from a resolv.conf, that the name responder relays the guests'
//! other queries to ([`super::dns_forward`]). The service runs on the host, so a loopback
//! resolver (systemd-resolved's 127.0.0.53 stub, a local dnsmasq or unbound) serves guests as
//! well as a remote one, which a guest given the host's list could never reach.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;

/// The port of every resolver resolv.conf names.
const PORT: u16 = 53;
/// Resolvers used, in order, as glibc reads no more.
pub const MAX_UPSTREAMS: usize = 3;

/// The resolvers of a resolv.conf text, in order, without duplicates, at most
/// [`MAX_UPSTREAMS`]: IPv4 and IPv6 (a link-local one with a `%zone` is skipped), loopback
/// included, never `responder` itself (asking it would loop) nor an unspecified or multicast
/// address.
pub fn upstreams(resolv_conf: &str, responder: Ipv4Addr) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for line in resolv_conf.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(Ok(ip)) = words.next().map(str::parse::<IpAddr>) else {
            continue;
        };
        let unusable = match ip {
            IpAddr::V4(v4) => v4 == responder || v4.is_broadcast(),
            IpAddr::V6(v6) => v6.is_unicast_link_local(),
        };
        if unusable || ip.is_unspecified() || ip.is_multicast() {
            continue;
        }
        let server = SocketAddr::new(ip, PORT);
        if !out.contains(&server) {
            out.push(server);
        }
        if out.len() == MAX_UPSTREAMS {
            break;
        }
    }
    out
}

/// The resolvers of the file at `path` ([`upstreams`]); none when it cannot be read.
pub fn upstreams_in(path: &Path, responder: Ipv4Addr) -> Vec<SocketAddr> {
    std::fs::read_to_string(path)
        .map(|text| upstreams(&text, responder))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GATEWAY: Ipv4Addr = Ipv4Addr::new(192, 168, 64, 1);

    fn at(ip: &str) -> SocketAddr {
        SocketAddr::new(ip.parse().unwrap(), 53)
    }

    #[test]
    fn loopback_and_ipv6_resolvers_are_kept_the_responder_is_not() {
        let text = "# generated\nsearch example.internal\nnameserver 127.0.0.53\n\
                    nameserver 10.255.255.53\nnameserver 192.168.64.1\nnameserver ::1\n\
                    nameserver 10.255.255.53\n  nameserver   192.0.2.7  # comment\n\
                    nameserver bogus\nnameserver 0.0.0.0\noptions edns0\n";
        assert_eq!(
            upstreams(text, GATEWAY),
            [at("127.0.0.53"), at("10.255.255.53"), at("::1")]
        );
        let v6 = "nameserver fe80::1%eth0\nnameserver fe80::1\nnameserver 2001:db8::53\n\
                  nameserver ff02::1\n";
        assert_eq!(upstreams(v6, GATEWAY), [at("2001:db8::53")]);
    }

    #[test]
    fn an_unreadable_file_has_no_resolvers() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("resolv.conf");
        assert!(upstreams_in(&file, GATEWAY).is_empty());
        std::fs::write(&file, "nameserver 198.51.100.1\n").unwrap();
        assert_eq!(upstreams_in(&file, GATEWAY), [at("198.51.100.1")]);
    }
}
