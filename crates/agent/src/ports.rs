//! The guest's side of port forwarding: which ports the guest serves ([`watch`]), and the
//! TCP connections ([`forward`]) and UDP datagrams ([`forward_udp`]) the host forwards to
//! them.
//!
//! A TCP port counts when a socket listens on it at a wildcard or loopback address, IPv4 or
//! IPv6 (`0.0.0.0`, `127.0.0.1`, `::`, `::1`, and their IPv4-mapped forms): exactly what a
//! connection to the guest's loopback reaches, which is where [`forward`] connects. A socket
//! bound to one of the guest's other addresses is left out.
//!
//! A UDP port counts when a socket is bound to it, not connected, at a wildcard or loopback
//! address (as TCP), and the port is one a user would mean to serve: 1024 or above, and
//! outside the guest's ephemeral range (`/proc/sys/net/ipv4/ip_local_port_range`, read at
//! each look). UDP has no listening state, so this is what tells a server from the rest: a
//! DHCP client (port 68), a stub resolver (127.0.0.53:53) and the random port of every
//! client socket that has not called connect(2) (a resolver's query, an NTP client) are
//! left out. A server bound inside the ephemeral range is missed: publish it
//! (`create -p HOST:GUEST/udp`).
//!
//! The sockets come from the kernel's sock_diag netlink dump (`netlink-packet-sock-diag`),
//! asked for listening TCP sockets and unconnected UDP ones only: small requests per address
//! family each second while the host watches, and nothing in between (the wait between
//! dumps is a poll(2) on the session's socket, which also ends the watch as soon as the
//! host closes it). A kernel without TCP or UDP sock_diag (`tcp_diag`, `udp_diag`: modules
//! the initramfs carries when the kernel has them) answers ENOENT; the agent then reads
//! `/proc/net/tcp` and `tcp6` (or `udp` and `udp6`), parsed here by hand because no
//! maintained crate reads them without pulling in all of procfs.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr as IpSocketAddr, TcpStream, UdpSocket,
};
use std::ops::RangeInclusive;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use container_agent_proto::{Frame, Kind, Message};
use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};
use vsock::VsockStream;

use crate::wire::{Writer, data, error, reply};

/// How often the listening sockets are read while the host watches.
const POLL: Duration = Duration::from_secs(1);
/// The buffer of each direction of a forwarded connection: large enough that a bulk
/// transfer moves in few vsock packets' worth of system calls.
const SPLICE_BUFFER: usize = 256 * 1024;
/// The largest UDP payload (IPv4's; IPv6 jumbograms do not cross loopback).
const MAX_DATAGRAM: usize = 65_535;
/// How often a UDP relay's receiving thread looks whether the host ended the session.
const UDP_STOP_CHECK: Duration = Duration::from_millis(500);
/// The ephemeral range when `/proc/sys/net/ipv4/ip_local_port_range` cannot be read:
/// Linux's default.
const DEFAULT_EPHEMERAL: RangeInclusive<u16> = 32768..=60999;

/// A socket's local address: where it listens or is bound.
type Bound = (IpAddr, u16);

/// A transport protocol whose sockets the agent lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// The ports the guest serves, as reported.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Served {
    tcp: Vec<u16>,
    udp: Vec<u16>,
}

/// Serves a `WatchPorts` session: the set now, then the set after each change, until the
/// host closes the session (or the stream breaks).
pub fn watch(reader: &VsockStream, writer: &Writer) -> std::io::Result<()> {
    let mut sources = Sources::open();
    let mut last: Option<Served> = None;
    loop {
        let now = match sources.served() {
            Ok(ports) => ports,
            Err(e) => return reply(writer, error(e, None)),
        };
        if last.as_ref() != Some(&now) {
            let message = Message::Ports {
                ports: now.tcp.clone(),
                udp: now.udp.clone(),
            };
            reply(writer, message)?;
            last = Some(now);
        }
        if host_closed_within(reader, POLL)? {
            return Ok(());
        }
    }
}

/// Where the sockets are read from: sock_diag while the kernel answers it for the
/// protocol, `/proc/net` from the first time it does not.
struct Sources {
    diag: Option<SockDiag>,
    tcp_diag: bool,
    udp_diag: bool,
}

impl Sources {
    fn open() -> Self {
        Self {
            diag: SockDiag::open().ok(),
            tcp_diag: true,
            udp_diag: true,
        }
    }

    /// The ports that count now (the module's doc says which).
    fn served(&mut self) -> Result<Served> {
        let tcp = ports_of(self.sockets(Proto::Tcp)?);
        let udp = udp_ports(self.sockets(Proto::Udp)?, &ephemeral_range());
        Ok(Served { tcp, udp })
    }

    /// The listening TCP sockets, or the unconnected bound UDP ones.
    fn sockets(&mut self, proto: Proto) -> Result<Vec<Bound>> {
        let use_diag = match proto {
            Proto::Tcp => &mut self.tcp_diag,
            Proto::Udp => &mut self.udp_diag,
        };
        if *use_diag && let Some(diag) = self.diag.as_mut() {
            match diag.sockets(proto) {
                Ok(found) => return Ok(found),
                // No sock_diag for this protocol in this kernel: /proc/net from now on.
                Err(_) => *use_diag = false,
            }
        }
        from_proc(proto)
    }
}

/// Waits up to `limit` for the host to close the session; true if it did. The host sends
/// nothing on a watch, so anything readable (the end of the stream included) ends it.
fn host_closed_within(reader: &VsockStream, limit: Duration) -> std::io::Result<bool> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let ms = u16::try_from(limit.as_millis()).unwrap_or(u16::MAX);
    let mut fds = [PollFd::new(reader.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::from(ms)) {
        Ok(0) => Ok(false),
        Ok(_) => Ok(true),
        Err(nix::errno::Errno::EINTR) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Serves a `Forward` session: connects to `port` on the guest's loopback, answers `Done`,
/// then copies bytes both ways. vhost-device-vsock passes no half-close (it acts only on a
/// shutdown of both directions), so when the guest's server has finished sending, the
/// session is shut down whole: the host's client sees the end of the reply (an HTTP/1.0
/// client that reads to the end would wait for ever otherwise). The host's half-close
/// comes as a message instead ([`forward_stream`]).
pub fn forward(port: u16, reader: VsockStream, writer: &Writer) -> std::io::Result<()> {
    let tcp = match connect(port) {
        Ok(t) => t,
        Err(e) => return reply(writer, error(e, None)),
    };
    reply(writer, Message::Done)?;
    let vsock = reader;
    std::thread::scope(|s| {
        s.spawn(|| {
            pump(&tcp, &vsock);
            let _ = vsock.shutdown(Shutdown::Both);
        });
        pump(&vsock, &tcp);
        let _ = tcp.shutdown(Shutdown::Write);
    });
    Ok(())
}

/// Serves a `ForwardStream` session: as [`forward`], but the host's bytes come in `Data`
/// frames, and its `DataEof` shuts down only the sending side of the guest connection, so
/// the guest's server reads the end of the request and still sends its reply.
pub fn forward_stream(port: u16, mut reader: VsockStream, writer: &Writer) -> std::io::Result<()> {
    let tcp = match connect(port) {
        Ok(t) => t,
        Err(e) => return reply(writer, error(e, None)),
    };
    reply(writer, Message::Done)?;
    let to_host = writer
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .try_clone()?;
    std::thread::scope(|s| {
        s.spawn(|| {
            pump(&tcp, &to_host);
            let _ = to_host.shutdown(Shutdown::Both);
        });
        let mut to_guest = &tcp;
        loop {
            match container_agent_proto::sync::read(&mut reader) {
                Ok(Some(Frame::Data(Kind::Data, bytes))) => {
                    if to_guest.write_all(&bytes).is_err() {
                        break;
                    }
                }
                Ok(Some(Frame::Message(Message::DataEof))) => {
                    let _ = tcp.shutdown(Shutdown::Write);
                    return;
                }
                // The host went away, or spoke out of turn: the connection ends both ways.
                _ => break,
            }
        }
        let _ = tcp.shutdown(Shutdown::Both);
    });
    Ok(())
}

/// Serves a `ForwardUdp` session: a UDP socket of its own, connected to the guest's server
/// on `port` (so only that server's replies reach it), then each `Data` frame from the host
/// is sent as one datagram and each datagram received goes back as one `Data` frame, until
/// the host closes the session. A datagram the server could not take (nothing bound there
/// any more: an ICMP port unreachable) is lost, as UDP's are.
pub fn forward_udp(port: u16, reader: VsockStream, writer: &Writer) -> std::io::Result<()> {
    let socket = match udp_socket(port) {
        Ok(s) => s,
        Err(e) => return reply(writer, error(e, None)),
    };
    reply(writer, Message::Done)?;
    relay_datagrams(&socket, reader, |datagram| {
        data(writer, Kind::Data, datagram)
    })
}

/// Relays between `socket` and the host until the host's side ends: each `Data` frame read
/// from `from_host` is sent as one datagram, each datagram received is passed whole to
/// `to_host`.
fn relay_datagrams<R: Read + Send>(
    socket: &UdpSocket,
    mut from_host: R,
    to_host: impl Fn(&[u8]) -> std::io::Result<()> + Sync,
) -> std::io::Result<()> {
    socket.set_read_timeout(Some(UDP_STOP_CHECK))?;
    let ended = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            while !ended.load(Ordering::Relaxed) {
                match socket.recv(&mut buf) {
                    Ok(n) => {
                        if to_host(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    Err(e) if udp_transient(&e) => {}
                    Err(_) => break,
                }
            }
            ended.store(true, Ordering::Relaxed);
        });
        while !ended.load(Ordering::Relaxed) {
            match container_agent_proto::sync::read(&mut from_host) {
                Ok(Some(Frame::Data(Kind::Data, datagram))) => {
                    // Lost when the server is gone, as a datagram is.
                    let _ = socket.send(&datagram);
                }
                _ => break,
            }
        }
        ended.store(true, Ordering::Relaxed);
    });
    Ok(())
}

/// A receive error that leaves the socket usable: the wait ran out (the stop check), a
/// signal, or the ICMP port unreachable a send to a server that went away brings back.
fn udp_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        WouldBlock | TimedOut | Interrupted | ConnectionRefused
    )
}

/// A UDP socket connected to the server bound to `port` in the guest, at the address that
/// reaches it (see [`udp_target`]).
fn udp_socket(port: u16) -> Result<UdpSocket> {
    let bound = Sources::open()
        .sockets(Proto::Udp)
        .context("listing the guest's UDP sockets")?;
    let Some(target) = udp_target(&bound, port) else {
        bail!("nothing in the machine is bound to UDP port {port}");
    };
    let local = match target {
        IpSocketAddr::V4(_) => IpSocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        IpSocketAddr::V6(_) => IpSocketAddr::from((Ipv6Addr::LOCALHOST, 0)),
    };
    let socket = UdpSocket::bind(local).context("opening a UDP socket")?;
    socket
        .connect(target)
        .with_context(|| format!("connecting a UDP socket to {target}"))?;
    Ok(socket)
}

/// The loopback address that reaches the unconnected UDP socket bound to `port`, among
/// `bound`: IPv4 first (a socket on `0.0.0.0` or `127.0.0.x`: that address, `127.0.0.1` for
/// the wildcard), else IPv6 (`::` or `::1`: `::1`; one IPv4-mapped: its IPv4 address).
fn udp_target(bound: &[Bound], port: u16) -> Option<IpSocketAddr> {
    let loopback = |ip: IpAddr| -> Option<IpAddr> {
        match ip {
            IpAddr::V4(a) if a.is_unspecified() => Some(Ipv4Addr::LOCALHOST.into()),
            IpAddr::V4(a) if a.is_loopback() => Some(a.into()),
            IpAddr::V6(a) if a.is_unspecified() || a.is_loopback() => {
                Some(Ipv6Addr::LOCALHOST.into())
            }
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) if v4.is_unspecified() => Some(Ipv4Addr::LOCALHOST.into()),
                Some(v4) if v4.is_loopback() => Some(v4.into()),
                _ => None,
            },
            IpAddr::V4(_) => None,
        }
    };
    let mut targets: Vec<IpAddr> = bound
        .iter()
        .filter(|(_, p)| *p == port)
        .filter_map(|(ip, _)| loopback(*ip))
        .collect();
    // IPv4 first, then by address: the same choice whatever order the kernel lists them in.
    targets.sort_by_key(|ip| (ip.is_ipv6(), *ip));
    targets.first().map(|ip| IpSocketAddr::new(*ip, port))
}

/// Copies until the end of `from` or a failure of either side.
fn pump<R, W>(mut from: R, mut to: W)
where
    R: Read,
    W: Write,
{
    let mut buf = vec![0u8; SPLICE_BUFFER];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// A connection to `port` on the guest's loopback: IPv4 first, then IPv6 (a server that
/// listens on `::1` only).
fn connect(port: u16) -> Result<TcpStream> {
    let tcp = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .or_else(|_| TcpStream::connect((Ipv6Addr::LOCALHOST, port)))
        .with_context(|| format!("nothing in the machine accepts connections on port {port}"))?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// Whether a socket listening (or bound) at `ip` is reached from the guest's loopback.
fn forwardable(ip: IpAddr) -> bool {
    let v4 = |a: Ipv4Addr| a.is_unspecified() || a.is_loopback();
    match ip {
        IpAddr::V4(a) => v4(a),
        IpAddr::V6(a) => {
            a.is_unspecified() || a.is_loopback() || a.to_ipv4_mapped().is_some_and(v4)
        }
    }
}

/// The ports of the listening sockets at `addresses` that count, sorted, each once.
fn ports_of(addresses: impl IntoIterator<Item = Bound>) -> Vec<u16> {
    let ports: BTreeSet<u16> = addresses
        .into_iter()
        .filter(|(ip, port)| *port != 0 && forwardable(*ip))
        .map(|(_, port)| port)
        .collect();
    ports.into_iter().collect()
}

/// The ports of the unconnected UDP sockets at `addresses` that a user would mean to serve:
/// those [`ports_of`] counts, from 1024 up, outside the `ephemeral` range.
fn udp_ports(
    addresses: impl IntoIterator<Item = Bound>,
    ephemeral: &RangeInclusive<u16>,
) -> Vec<u16> {
    ports_of(addresses)
        .into_iter()
        .filter(|p| *p >= 1024 && !ephemeral.contains(p))
        .collect()
}

/// The guest's ephemeral port range, where the kernel picks the port of a socket that did
/// not bind one.
fn ephemeral_range() -> RangeInclusive<u16> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| parse_port_range(&text))
        .unwrap_or(DEFAULT_EPHEMERAL)
}

/// `ip_local_port_range`'s text: two numbers, low and high.
fn parse_port_range(text: &str) -> Option<RangeInclusive<u16>> {
    let mut words = text.split_whitespace().map(str::parse::<u16>);
    let (Some(Ok(low)), Some(Ok(high))) = (words.next(), words.next()) else {
        return None;
    };
    Some(low..=high)
}

/// The listening TCP sockets or unconnected UDP sockets, from `/proc/net/tcp` and `tcp6`
/// (or `udp` and `udp6`).
fn from_proc(proto: Proto) -> Result<Vec<Bound>> {
    let name = proto.name();
    let v4 = std::fs::read_to_string(format!("/proc/net/{name}"))
        .with_context(|| format!("reading /proc/net/{name}"))?;
    let v6 = std::fs::read_to_string(format!("/proc/net/{name}6")).unwrap_or_default();
    // TCP_LISTEN, and TCP_CLOSE: what an unconnected UDP socket's state reads.
    let state = match proto {
        Proto::Tcp => "0A",
        Proto::Udp => "07",
    };
    Ok(proc_net_sockets(&v4, state)
        .into_iter()
        .chain(proc_net_sockets(&v6, state))
        .collect())
}

/// The sockets in `state` of a `/proc/net/tcp`, `tcp6`, `udp` or `udp6` text: each one's
/// local address (hex, each 32-bit word in the host's byte order) and port (hex).
fn proc_net_sockets(text: &str, state: &str) -> Vec<Bound> {
    let word = |hex: &str| u32::from_str_radix(hex, 16).ok().map(u32::to_ne_bytes);
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1)?;
            if fields.nth(1)? != state {
                return None;
            }
            let (addr, port) = local.split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            let ip = match addr.len() {
                8 => IpAddr::V4(Ipv4Addr::from(word(addr)?)),
                32 => {
                    let mut bytes = [0u8; 16];
                    for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                        chunk.copy_from_slice(&word(addr.get(i * 8..i * 8 + 8)?)?);
                    }
                    IpAddr::V6(Ipv6Addr::from(bytes))
                }
                _ => return None,
            };
            Some((ip, port))
        })
        .collect()
}

/// A sock_diag netlink socket.
struct SockDiag {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl SockDiag {
    fn open() -> Result<Self> {
        let mut socket = Socket::new(NETLINK_SOCK_DIAG).context("opening a sock_diag socket")?;
        socket.bind_auto().context("binding the sock_diag socket")?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .context("connecting the sock_diag socket")?;
        Ok(Self {
            socket,
            seq: 0,
            buf: vec![0u8; 64 * 1024],
        })
    }

    /// The listening TCP sockets, or the unconnected UDP ones, IPv4 and IPv6. A kernel
    /// without IPv6 has none of those.
    fn sockets(&mut self, proto: Proto) -> Result<Vec<Bound>> {
        let mut all = self
            .dump(AF_INET, proto)
            .with_context(|| format!("listing IPv4 {} sockets", proto.name()))?;
        if let Ok(v6) = self.dump(AF_INET6, proto) {
            all.extend(v6);
        }
        Ok(all)
    }

    /// Every listening TCP socket (or unconnected UDP socket) of `family`: its local
    /// address and port.
    fn dump(&mut self, family: u8, proto: Proto) -> Result<Vec<Bound>> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: match proto {
                    Proto::Tcp => IPPROTO_TCP,
                    Proto::Udp => IPPROTO_UDP,
                },
                extensions: ExtensionFlags::empty(),
                // A UDP socket's state is TCP_CLOSE until it connects.
                states: match proto {
                    Proto::Tcp => StateFlags::LISTEN,
                    Proto::Udp => StateFlags::CLOSE,
                },
                socket_id: match family {
                    AF_INET6 => SocketId::new_v6(),
                    _ => SocketId::new_v4(),
                },
            })
            .into(),
        );
        packet.finalize();
        let mut out = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut out);
        self.socket
            .send(&out, 0)
            .context("sending the dump request")?;
        let mut found = Vec::new();
        loop {
            let n = self
                .socket
                .recv(&mut &mut self.buf[..], 0)
                .context("reading the dump")?;
            let mut offset = 0;
            while offset < n {
                let message = NetlinkMessage::<SockDiagMessage>::deserialize(&self.buf[offset..n])
                    .map_err(|e| anyhow!("a sock_diag message did not parse: {e}"))?;
                let len = message.header.length as usize;
                if message.header.sequence_number != self.seq {
                    // A late answer to an earlier request: not ours.
                } else {
                    match message.payload {
                        NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                            let id = &r.header.socket_id;
                            found.push((id.source_address, id.source_port));
                        }
                        NetlinkPayload::Done(_) => return Ok(found),
                        NetlinkPayload::Error(e) => {
                            return Err(anyhow!("the kernel refused the dump: {e:?}"));
                        }
                        _ => {}
                    }
                }
                if len == 0 {
                    break;
                }
                offset += len;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ip: &str, port: u16) -> Bound {
        (ip.parse::<IpAddr>().unwrap(), port)
    }

    #[test]
    fn only_wildcard_and_loopback_listeners_count_each_port_once() {
        let sockets = [
            at("0.0.0.0", 8080),
            at("::", 8080),
            at("127.0.0.1", 5432),
            at("::1", 3000),
            at("::ffff:127.0.0.1", 4000),
            at("192.168.64.3", 9000),
            at("fe80::1", 9001),
            at("::ffff:10.0.0.1", 9002),
            at("0.0.0.0", 22),
        ];
        assert_eq!(ports_of(sockets), [22, 3000, 4000, 5432, 8080]);
    }

    #[test]
    fn udp_servers_count_but_not_dhcp_resolvers_or_client_sockets() {
        let ephemeral = 32768..=60999;
        let sockets = [
            // Servers a user starts: counted.
            at("0.0.0.0", 5353),
            at("::", 5353),
            at("127.0.0.1", 8125),
            at("::1", 4789),
            at("0.0.0.0", 1024),
            at("0.0.0.0", 61000),
            // A DHCP client, a stub resolver, NTP: below 1024.
            at("0.0.0.0", 68),
            at("127.0.0.53", 53),
            at("0.0.0.0", 123),
            // Unconnected client sockets: their ports are the kernel's pick.
            at("0.0.0.0", 32768),
            at("0.0.0.0", 45123),
            at("::", 60999),
            // Bound to another of the guest's addresses: not reached from its loopback.
            at("192.168.64.3", 9999),
        ];
        assert_eq!(
            udp_ports(sockets, &ephemeral),
            [1024, 4789, 5353, 8125, 61000]
        );
        // A narrower range leaves more to serve.
        assert_eq!(udp_ports([at("0.0.0.0", 45123)], &(50000..=60000)), [45123]);
    }

    #[test]
    fn the_ephemeral_range_is_read_as_the_kernel_writes_it() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some(32768..=60999));
        assert_eq!(parse_port_range("1024 65535"), Some(1024..=65535));
        assert_eq!(parse_port_range("garbage"), None);
        assert_eq!(parse_port_range(""), None);
        let here = ephemeral_range();
        assert!(here.start() <= here.end(), "{here:?}");
    }

    #[test]
    fn a_udp_forward_goes_to_the_loopback_address_that_reaches_the_server() {
        let target = |bound: &[Bound], port| udp_target(bound, port).map(|a| a.to_string());
        let v4_and_v6 = [at("::", 5353), at("0.0.0.0", 5353), at("0.0.0.0", 9)];
        assert_eq!(target(&v4_and_v6, 5353).as_deref(), Some("127.0.0.1:5353"));
        assert_eq!(
            target(&[at("::", 5353)], 5353).as_deref(),
            Some("[::1]:5353")
        );
        assert_eq!(
            target(&[at("::1", 5353)], 5353).as_deref(),
            Some("[::1]:5353")
        );
        let mapped = [at("::ffff:127.0.0.2", 5353)];
        assert_eq!(target(&mapped, 5353).as_deref(), Some("127.0.0.2:5353"));
        let other = [at("127.0.0.2", 8125)];
        assert_eq!(target(&other, 8125).as_deref(), Some("127.0.0.2:8125"));
        assert_eq!(target(&[at("192.168.64.3", 5353)], 5353), None);
        assert_eq!(target(&v4_and_v6, 5354), None);
    }

    #[test]
    fn proc_net_tcp_gives_the_listening_sockets() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
           0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0\n\
           1: 0100007F:1538 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0\n\
           2: 0340A8C0:2328 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3 1 0\n\
           3: 0100007F:1F90 0100007F:C000 01 00000000:00000000 00:00000000 00000000     0        0 4 1 0\n";
        let v6 = "  sl  local_address                         remote_address                        st\n\
           0: 00000000000000000000000001000000:0BB8 00000000000000000000000000000000:0000 0A 0\n\
           1: 0000000000000000FFFF00000100007F:0FA0 00000000000000000000000000000000:0000 0A 0\n";
        let found: Vec<_> = proc_net_sockets(v4, "0A")
            .into_iter()
            .chain(proc_net_sockets(v6, "0A"))
            .collect();
        assert_eq!(
            found,
            [
                at("0.0.0.0", 8080),
                at("127.0.0.1", 5432),
                at("192.168.64.3", 9000),
                at("::1", 3000),
                at("::ffff:127.0.0.1", 4000),
            ]
        );
        assert_eq!(ports_of(found), [3000, 4000, 5432, 8080]);
    }

    #[test]
    fn proc_net_udp_gives_the_unconnected_sockets() {
        // A server on 5353, a DHCP client on 68, a stub resolver, and a connected client.
        let v4 = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
           0: 00000000:14E9 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2 0 0\n\
           1: 00000000:0044 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 2 2 0 0\n\
           2: 3500007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 3 2 0 0\n\
           3: 0100007F:B2C1 0100007F:14E9 01 00000000:00000000 00:00000000 00000000     0        0 4 2 0 0\n";
        let v6 = "  sl  local_address                         remote_address                        st\n\
           0: 00000000000000000000000000000000:1FBD 00000000000000000000000000000000:0000 07 0\n";
        let found: Vec<_> = proc_net_sockets(v4, "07")
            .into_iter()
            .chain(proc_net_sockets(v6, "07"))
            .collect();
        assert_eq!(
            found,
            [
                at("0.0.0.0", 5353),
                at("0.0.0.0", 68),
                at("127.0.0.53", 53),
                at("::", 8125),
            ]
        );
        assert_eq!(udp_ports(found, &DEFAULT_EPHEMERAL), [5353, 8125]);
    }

    #[test]
    fn the_kernels_listening_sockets_are_read_as_they_come_and_go() {
        let mut diag = SockDiag::open().unwrap();
        let v4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p4 = v4.local_addr().unwrap().port();
        let v6 = std::net::TcpListener::bind("[::1]:0").ok();
        let p6 = v6.as_ref().map(|l| l.local_addr().unwrap().port());
        let now = ports_of(diag.sockets(Proto::Tcp).unwrap());
        assert!(now.contains(&p4), "{p4} not in {now:?}");
        let procfs = ports_of(from_proc(Proto::Tcp).unwrap());
        assert!(procfs.contains(&p4), "{p4} not in {procfs:?}");
        if let Some(p6) = p6 {
            assert!(now.contains(&p6), "{p6} not in {now:?}");
        }
        // A connected socket is not a listener.
        let client = TcpStream::connect(("127.0.0.1", p4)).unwrap();
        let local = client.local_addr().unwrap().port();
        drop(v4);
        let now = ports_of(diag.sockets(Proto::Tcp).unwrap());
        assert!(!now.contains(&p4), "{p4} still in {now:?}");
        assert!(!now.contains(&local), "{local} in {now:?}");
    }

    /// A UDP socket bound to a port of `127.0.0.1` outside this host's ephemeral range.
    fn udp_server() -> UdpSocket {
        let ephemeral = ephemeral_range();
        (20000..30000)
            .filter(|p| !ephemeral.contains(p))
            .find_map(|p| UdpSocket::bind(("127.0.0.1", p)).ok())
            .expect("a free UDP port")
    }

    #[test]
    fn the_kernels_udp_sockets_are_read_bound_and_not_once_connected() {
        let server = udp_server();
        let port = server.local_addr().unwrap().port();
        let mut diag = SockDiag::open().unwrap();
        // The kernel here may lack udp_diag; /proc/net/udp is the agent's fallback then.
        let by_diag = diag.sockets(Proto::Udp).ok();
        let by_proc = from_proc(Proto::Udp).unwrap();
        for found in by_diag.iter().chain([&by_proc]) {
            let ports = udp_ports(found.clone(), &ephemeral_range());
            assert!(ports.contains(&port), "{port} not in {ports:?}");
            assert_eq!(
                udp_target(found, port),
                Some(IpSocketAddr::from((Ipv4Addr::LOCALHOST, port)))
            );
        }
        // Connected, it is a client: not listed.
        server.connect(("127.0.0.1", 9)).unwrap();
        let now = Sources::open().sockets(Proto::Udp).unwrap();
        assert!(
            !ports_of(now).contains(&port),
            "{port} listed once connected"
        );
    }

    #[test]
    fn each_frame_is_one_datagram_and_each_reply_one_frame_until_the_host_closes() {
        let server = udp_server();
        let port = server.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let mut buf = [0u8; MAX_DATAGRAM];
            while let Ok((n, peer)) = server.recv_from(&mut buf) {
                let reply = [b"echo:", &buf[..n]].concat();
                server.send_to(&reply, peer).unwrap();
            }
        });
        let socket = udp_socket(port).unwrap();
        let (agent_end, mut host_end) = std::os::unix::net::UnixStream::pair().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
        let relay = std::thread::spawn(move || {
            relay_datagrams(&socket, agent_end, |d| {
                tx.send(d.to_vec()).map_err(std::io::Error::other)
            })
        });
        let big = vec![7u8; 60_000];
        for datagram in [&b"one"[..], b"", &big] {
            container_agent_proto::sync::write(
                &mut host_end,
                &Frame::Data(Kind::Data, datagram.to_vec()),
            )
            .unwrap();
            let back = rx.recv_timeout(Duration::from_secs(5)).unwrap();
            assert_eq!(back, [b"echo:", datagram].concat());
        }
        // The host closing the session ends the relay (within the stop check).
        drop(host_end);
        let started = std::time::Instant::now();
        relay.join().unwrap().unwrap();
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn a_udp_port_nobody_serves_is_refused() {
        // Below the ports `udp_server` takes, so no test running beside this one serves it.
        let port = (10000..20000)
            .find(|p| UdpSocket::bind(("127.0.0.1", *p)).is_ok())
            .expect("a free UDP port");
        let err = udp_socket(port).unwrap_err();
        assert!(
            format!("{err:#}").contains("nothing in the machine"),
            "{err:#}"
        );
    }
}
