//! `container machine ports`: the host ports forwarded to a machine, each with its guest port
//! and protocol, and whether the host has it (forwarded) or not (refused, and why).

use clap::Args;
use container_api::Client;
use container_api::ports::{PortForward, Protocol};

use crate::output::{self, Format, Tabular};

#[derive(Debug, Args)]
#[command(after_help = "\
A running machine's listening TCP ports (on a wildcard or loopback address in the guest) are \
forwarded from the same port on the host's 127.0.0.1 (and ::1), ports below 1024 from 10000 + \
PORT, and so are the ports published with `machine create --publish HOST:GUEST[/udp]`. A host \
port something else already listens on is never taken: it shows as refused, and is forwarded \
once it is free. Turn the automatic part off with `container machine set -n NAME \
forward-ports=off`.

UDP ports are forwarded the same way when a server in the guest is bound to one (a socket not \
connected, on a wildcard or loopback address) numbered 1024 or above and outside the guest's \
ephemeral range (its /proc/sys/net/ipv4/ip_local_port_range, 32768-60999 by default): that \
leaves out DHCP and DNS clients, the stub resolver on 127.0.0.53 and the random ports of client \
sockets. Publish any other UDP port (`--publish 5300:53/udp`). Each host client (source address \
and port) reaches the guest's server as a peer of its own, until it has sent or received \
nothing for 60 s; at most 128 clients at once per port.")]
pub struct PortsArgs {
    /// The machine (default: the default machine).
    name: Option<String>,
    #[arg(long, value_enum, default_value_t)]
    format: Format,
    /// Print only the host addresses forwarded: ADDRESS:PORT, followed by /udp for UDP.
    #[arg(short, long)]
    quiet: bool,
}

impl Tabular for PortForward {
    fn headers() -> Vec<&'static str> {
        vec!["GUEST PORT", "HOST", "STATE"]
    }
    fn row(&self) -> Vec<String> {
        let state = match &self.reason {
            Some(reason) => format!("{}: {reason}", self.state),
            None => self.state.to_string(),
        };
        let guest = match self.published {
            true => format!("{}/{} (published)", self.guest_port, self.protocol),
            false => format!("{}/{}", self.guest_port, self.protocol),
        };
        vec![guest, host(self), state]
    }
    fn id(&self) -> String {
        match self.protocol {
            Protocol::Tcp => host(self),
            Protocol::Udp => format!("{}/udp", host(self)),
        }
    }
}

/// The host address and port, ADDRESS:PORT (`[ADDRESS]:PORT` for IPv6).
fn host(p: &PortForward) -> String {
    match p.host_address.contains(':') {
        true => format!("[{}]:{}", p.host_address, p.host_port),
        false => format!("{}:{}", p.host_address, p.host_port),
    }
}

pub async fn run(client: &Client, args: PortsArgs) -> anyhow::Result<()> {
    let name = super::resolve_name(client, args.name).await?;
    let ports: Vec<PortForward> = client.get(&format!("/machines/{name}/ports")).await?;
    let shown: Vec<PortForward> = match args.quiet {
        true => ports
            .into_iter()
            .filter(|p| p.state == container_api::ports::PortState::Forwarded)
            .collect(),
        false => ports,
    };
    print!("{}", output::render_list(&shown, args.format, args.quiet)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use container_api::ports::PortState;

    fn forward(guest_port: u16, protocol: Protocol, published: bool) -> PortForward {
        PortForward {
            guest_port,
            protocol,
            host_address: "127.0.0.1".into(),
            host_port: guest_port,
            state: PortState::Forwarded,
            reason: None,
            published,
        }
    }

    #[test]
    fn rows_say_the_protocol_and_quiet_lines_mark_udp() {
        let tcp = forward(8080, Protocol::Tcp, false);
        let udp = forward(5353, Protocol::Udp, true);
        assert_eq!(tcp.row(), ["8080/tcp", "127.0.0.1:8080", "forwarded"]);
        assert_eq!(
            udp.row(),
            ["5353/udp (published)", "127.0.0.1:5353", "forwarded"]
        );
        // `-q` prints what a client connects to: TCP as before, UDP marked.
        assert_eq!(tcp.id(), "127.0.0.1:8080");
        assert_eq!(udp.id(), "127.0.0.1:5353/udp");
        let json = serde_json::to_value(&udp).unwrap();
        assert_eq!(json["protocol"], "udp");
        assert_eq!(json["guestPort"], 5353);
    }
}
