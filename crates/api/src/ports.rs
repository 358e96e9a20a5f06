//! Ports forwarded from the host to a machine: what `GET /v1/machines/{name}/ports`,
//! `machine ports` and `inspect` show, `--publish` at create, and the host port a guest port
//! gets by default.

use serde::{Deserialize, Serialize};

/// The host port a guest port is forwarded from unless published otherwise: the same one,
/// except below 1024 (ports a user's own server rarely needs privileged on the host, and
/// which the host's own services hold: 22, 80), which get `10000 + port`.
pub fn default_host_port(guest_port: u16) -> u16 {
    match guest_port {
        p if p < 1024 => 10000 + p,
        p => p,
    }
}

/// The transport protocol of a forwarded port. A host port is a pair of it and the number:
/// TCP 5353 and UDP 5353 are two ports, forwarded independently.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl Protocol {
    /// TCP, the default (left out of a publish's JSON, as records written before UDP had it).
    pub fn is_tcp(&self) -> bool {
        *self == Protocol::Tcp
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

/// A host port forwarded to a guest port whatever the guest listens on (`--publish
/// HOST:GUEST[/udp]`): the host listens as long as the machine runs. Shown in camelCase with
/// the machine; the snake_case of request bodies is accepted too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Publish {
    #[serde(alias = "host_port")]
    pub host_port: u16,
    #[serde(alias = "guest_port")]
    pub guest_port: u16,
    /// Absent (TCP) unless UDP, so a TCP publish reads as it did before UDP was forwarded.
    #[serde(default, skip_serializing_if = "Protocol::is_tcp")]
    pub protocol: Protocol,
}

impl std::str::FromStr for Publish {
    type Err = String;
    /// `HOST:GUEST`, or `PORT` for the same port on both sides, each optionally followed by
    /// `/tcp` (the default) or `/udp`, as Docker's `-p` takes them.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let port = |p: &str| {
            p.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("invalid port `{p}` in `{s}`: expected 1 to 65535"))
        };
        let (ports, protocol) = match s.rsplit_once('/') {
            None => (s, Protocol::Tcp),
            Some((ports, "tcp")) => (ports, Protocol::Tcp),
            Some((ports, "udp")) => (ports, Protocol::Udp),
            Some((_, other)) => {
                return Err(format!(
                    "invalid protocol `{other}` in `{s}`: expected tcp or udp"
                ));
            }
        };
        let (host, guest) = ports.split_once(':').unwrap_or((ports, ports));
        Ok(Publish {
            host_port: port(host)?,
            guest_port: port(guest)?,
            protocol,
        })
    }
}

impl std::fmt::Display for Publish {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host_port, self.guest_port)?;
        match self.protocol {
            Protocol::Tcp => Ok(()),
            Protocol::Udp => write!(f, "/udp"),
        }
    }
}

/// Whether the host listens for a guest port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortState {
    /// The host listens and forwards each connection (for UDP: each client's datagrams) to
    /// the guest port.
    Forwarded,
    /// The host could not listen (`reason` says why: most often another program, or another
    /// machine, holds the host port); tried again every few seconds.
    Refused,
}

impl std::fmt::Display for PortState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Forwarded => "forwarded",
            Self::Refused => "refused",
        })
    }
}

/// One guest port and the host address that forwards to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortForward {
    pub guest_port: u16,
    /// `tcp` or `udp`; the same on both sides. Read as TCP when absent (a service from before
    /// UDP was forwarded).
    #[serde(default)]
    pub protocol: Protocol,
    /// The host address listened on (`[network] forward-address`, 127.0.0.1 by default;
    /// `::1` is listened on too when it is 127.0.0.1 and the host has IPv6).
    pub host_address: String,
    pub host_port: u16,
    pub state: PortState,
    /// Why the host port is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Published at create (kept whether the guest listens or not), rather than found
    /// listening in the guest.
    #[serde(default)]
    pub published: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn privileged_guest_ports_move_above_10000() {
        assert_eq!(default_host_port(80), 10080);
        assert_eq!(default_host_port(22), 10022);
        assert_eq!(default_host_port(1023), 11023);
        assert_eq!(default_host_port(1024), 1024);
        assert_eq!(default_host_port(8080), 8080);
    }

    #[test]
    fn publish_takes_dockers_protocol_suffix() {
        let p: Publish = "5353:53/udp".parse().unwrap();
        assert_eq!(
            (p.host_port, p.guest_port, p.protocol),
            (5353, 53, Protocol::Udp)
        );
        assert_eq!(p.to_string(), "5353:53/udp");
        let p: Publish = "9000/udp".parse().unwrap();
        assert_eq!((p.host_port, p.guest_port), (9000, 9000));
        let p: Publish = "9000:80/tcp".parse().unwrap();
        assert_eq!(
            (p.protocol, p.to_string().as_str()),
            (Protocol::Tcp, "9000:80")
        );
        // A TCP publish is written as before UDP existed; UDP says so.
        let tcp = serde_json::to_string(&"9000:80".parse::<Publish>().unwrap()).unwrap();
        assert_eq!(tcp, r#"{"hostPort":9000,"guestPort":80}"#);
        let udp = serde_json::to_string(&"53:53/udp".parse::<Publish>().unwrap()).unwrap();
        assert_eq!(udp, r#"{"hostPort":53,"guestPort":53,"protocol":"udp"}"#);
        let back: Publish = serde_json::from_str(&udp).unwrap();
        assert_eq!(back.protocol, Protocol::Udp);
    }

    #[test]
    fn publish_reads_either_case_in_json() {
        let p: Publish = serde_json::from_str(r#"{"host_port":9000,"guest_port":80}"#).unwrap();
        let q: Publish = serde_json::from_str(r#"{"hostPort":9000,"guestPort":80}"#).unwrap();
        assert_eq!(p, q);
        assert!(serde_json::from_str::<Publish>(r#"{"hostPort":9000}"#).is_err());
    }

    #[test]
    fn publish_reads_host_colon_guest_or_one_port() {
        let p: Publish = "9000:80".parse().unwrap();
        assert_eq!((p.host_port, p.guest_port), (9000, 80));
        assert_eq!(p.to_string(), "9000:80");
        assert_eq!(p.protocol, Protocol::Tcp);
        let p: Publish = "8080".parse().unwrap();
        assert_eq!((p.host_port, p.guest_port), (8080, 8080));
        for bad in [
            "0:80", "80:", "x:80", "70000:1", "", "53/sctp", "53/", "/udp",
        ] {
            assert!(bad.parse::<Publish>().is_err(), "{bad}");
        }
    }
}
