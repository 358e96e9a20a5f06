//! The guest network, through rtnetlink: loopback up always; with a config, the interface
//! up with its address and a default route through the gateway. Replacing, not adding, so a
//! config applied twice yields the same state.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use container_agent_proto::NetConfig;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkFlags, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// How long the interface may take to appear after its driver loaded.
const INTERFACE_WAIT: Duration = Duration::from_secs(10);

/// Brings loopback up and applies `net` when given.
pub fn configure(net: Option<&NetConfig>) -> Result<()> {
    let mut nl = Netlink::open()?;
    nl.link_up(ifindex("lo")?).context("bringing up lo")?;
    let Some(net) = net else { return Ok(()) };
    let (address, prefix) = parse_cidr(&net.address_cidr)?;
    let gateway: Ipv4Addr = net
        .gateway
        .parse()
        .with_context(|| format!("gateway {:?} is not an IPv4 address", net.gateway))?;
    let deadline = Instant::now() + INTERFACE_WAIT;
    let index = loop {
        match ifindex(&net.interface) {
            Ok(i) => break i,
            Err(e) if Instant::now() > deadline => {
                return Err(e.context("is the virtio_net module in the initramfs?"));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    nl.add_address(index, address, prefix)
        .with_context(|| format!("adding {} to {}", net.address_cidr, net.interface))?;
    nl.link_up(index)
        .with_context(|| format!("bringing up {}", net.interface))?;
    nl.default_route(index, gateway)
        .with_context(|| format!("adding the default route via {gateway}"))?;
    Ok(())
}

fn parse_cidr(cidr: &str) -> Result<(Ipv4Addr, u8)> {
    let (a, p) = cidr
        .split_once('/')
        .ok_or_else(|| anyhow!("address {cidr:?} has no /prefix"))?;
    let a: Ipv4Addr = a
        .parse()
        .with_context(|| format!("address {cidr:?} is not IPv4"))?;
    let p: u8 = p
        .parse()
        .ok()
        .filter(|p| *p <= 32)
        .ok_or_else(|| anyhow!("address {cidr:?} has a bad prefix"))?;
    Ok((a, p))
}

fn ifindex(name: &str) -> Result<u32> {
    let path = format!("/sys/class/net/{name}/ifindex");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("network interface {name} does not exist"))?;
    text.trim()
        .parse()
        .with_context(|| format!("reading {path}"))
}

struct Netlink {
    socket: Socket,
    seq: u32,
}

impl Netlink {
    fn open() -> Result<Netlink> {
        let mut socket = Socket::new(NETLINK_ROUTE).context("opening a netlink socket")?;
        socket.bind_auto().context("binding the netlink socket")?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .context("connecting the netlink socket")?;
        Ok(Netlink { socket, seq: 0 })
    }

    /// Sends one request and waits for its acknowledgement.
    fn request(&mut self, msg: RouteNetlinkMessage, flags: u16) -> std::io::Result<()> {
        self.seq += 1;
        let mut req = NetlinkMessage::from(msg);
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        req.header.sequence_number = self.seq;
        req.finalize();
        let mut buf = vec![0u8; req.buffer_len()];
        req.serialize(&mut buf);
        self.socket.send(&buf, 0)?;
        loop {
            let (reply, _) = self.socket.recv_from_full()?;
            let mut at = 0;
            while at < reply.len() {
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply[at..])
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                let len = msg.header.length as usize;
                if msg.header.sequence_number == self.seq
                    && let NetlinkPayload::Error(e) = msg.payload
                {
                    return match e.code {
                        None => Ok(()),
                        Some(_) => Err(e.to_io()),
                    };
                }
                if len == 0 {
                    break;
                }
                at += len;
            }
        }
    }

    fn link_up(&mut self, index: u32) -> std::io::Result<()> {
        let mut link = LinkMessage::default();
        link.header.index = index;
        link.header.flags |= LinkFlags::Up;
        link.header.change_mask |= LinkFlags::Up;
        self.request(RouteNetlinkMessage::SetLink(link), 0)
    }

    fn add_address(&mut self, index: u32, address: Ipv4Addr, prefix: u8) -> std::io::Result<()> {
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.index = index;
        msg.header.prefix_len = prefix;
        msg.attributes
            .push(AddressAttribute::Local(IpAddr::V4(address)));
        msg.attributes
            .push(AddressAttribute::Address(IpAddr::V4(address)));
        if prefix < 31 {
            let broadcast = Ipv4Addr::from(u32::from(address) | (u32::MAX >> prefix));
            msg.attributes.push(AddressAttribute::Broadcast(broadcast));
        }
        self.request(
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
    }

    fn default_route(&mut self, index: u32, gateway: Ipv4Addr) -> std::io::Result<()> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = AddressFamily::Inet;
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        msg.header.protocol = RouteProtocol::Static;
        msg.header.scope = RouteScope::Universe;
        msg.header.kind = RouteType::Unicast;
        msg.attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet(gateway)));
        msg.attributes.push(RouteAttribute::Oif(index));
        self.request(
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_or_say_why_not() {
        assert_eq!(
            parse_cidr("192.168.64.7/24").unwrap(),
            ("192.168.64.7".parse().unwrap(), 24)
        );
        assert!(
            parse_cidr("192.168.64.7")
                .unwrap_err()
                .to_string()
                .contains("no /prefix")
        );
        assert!(
            parse_cidr("192.168.64.7/33")
                .unwrap_err()
                .to_string()
                .contains("bad prefix")
        );
        assert!(parse_cidr("fe80::1/64").is_err());
    }
}
