//! The guest's side of port forwarding: which TCP ports the guest listens on ([`watch`]), and
//! the connections the host forwards to them ([`forward`]).
//!
//! A port counts when a socket listens on it at a wildcard or loopback address, IPv4 or IPv6
//! (`0.0.0.0`, `127.0.0.1`, `::`, `::1`, and their IPv4-mapped forms): exactly what a
//! connection to the guest's loopback reaches, which is where [`forward`] connects. A socket
//! bound to one of the guest's other addresses is left out. UDP is not forwarded.
//!
//! The sockets come from the kernel's sock_diag netlink dump (`netlink-packet-sock-diag`),
//! asked for listening TCP sockets only: one small request per address family each second
//! while the host watches, and nothing in between (the wait between dumps is a poll(2) on
//! the session's socket, which also ends the watch as soon as the host closes it). A kernel
//! without TCP sock_diag (`tcp_diag`, a module the initramfs carries when the kernel has it)
//! answers ENOENT; the agent then reads `/proc/net/tcp` and `tcp6`, parsed here by hand
//! because no maintained crate reads them without pulling in all of procfs.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, TcpStream};
use std::os::fd::AsFd;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use container_agent_proto::Message;
use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};
use vsock::VsockStream;

use crate::wire::{Writer, error, reply};

/// How often the listening sockets are read while the host watches.
const POLL: Duration = Duration::from_secs(1);
/// The buffer of each direction of a forwarded connection: large enough that a bulk
/// transfer moves in few vsock packets' worth of system calls.
const SPLICE_BUFFER: usize = 256 * 1024;

/// Serves a `WatchPorts` session: the set now, then the set after each change, until the
/// host closes the session (or the stream breaks).
pub fn watch(reader: &VsockStream, writer: &Writer) -> std::io::Result<()> {
    let mut diag = SockDiag::open().ok();
    let mut last: Option<Vec<u16>> = None;
    loop {
        let from_diag = diag.as_mut().map(|d| d.listening());
        let now = match from_diag {
            Some(Ok(ports)) => Ok(ports),
            Some(Err(_)) | None => {
                // No TCP sock_diag in this kernel: /proc/net from now on.
                diag = None;
                from_proc()
            }
        };
        let now = match now {
            Ok(ports) => ports,
            Err(e) => return reply(writer, error(e, None)),
        };
        if last.as_ref() != Some(&now) {
            reply(writer, Message::Ports { ports: now.clone() })?;
            last = Some(now);
        }
        if host_closed_within(reader, POLL)? {
            return Ok(());
        }
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
/// then copies bytes both ways. vhost-device-vsock passes no half-close to the host (it
/// acts only on a shutdown of both directions), so when the guest's server has finished
/// sending, the session is shut down whole: the host's client sees the end of the reply
/// (an HTTP/1.0 client that reads to the end would wait for ever otherwise).
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

/// Whether a socket listening at `ip` is reached by a connection to the guest's loopback.
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
fn ports_of(addresses: impl IntoIterator<Item = (IpAddr, u16)>) -> Vec<u16> {
    let ports: BTreeSet<u16> = addresses
        .into_iter()
        .filter(|(ip, port)| *port != 0 && forwardable(*ip))
        .map(|(_, port)| port)
        .collect();
    ports.into_iter().collect()
}

/// The forwardable listening TCP ports, from `/proc/net/tcp` and `tcp6`.
fn from_proc() -> Result<Vec<u16>> {
    let v4 = std::fs::read_to_string("/proc/net/tcp").context("reading /proc/net/tcp")?;
    let v6 = std::fs::read_to_string("/proc/net/tcp6").unwrap_or_default();
    Ok(ports_of(
        proc_net_listening(&v4)
            .into_iter()
            .chain(proc_net_listening(&v6)),
    ))
}

/// The listening sockets of a `/proc/net/tcp` or `tcp6` text: its local address (hex, each
/// 32-bit word in the host's byte order) and port (hex), state `0A` (LISTEN).
fn proc_net_listening(text: &str) -> Vec<(IpAddr, u16)> {
    let word = |hex: &str| u32::from_str_radix(hex, 16).ok().map(u32::to_ne_bytes);
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1)?;
            let state = fields.nth(1)?;
            if state != "0A" {
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

    /// The forwardable listening TCP ports, IPv4 and IPv6. A kernel without IPv6 has none
    /// of those.
    fn listening(&mut self) -> Result<Vec<u16>> {
        let mut all = self
            .dump(AF_INET)
            .context("listing IPv4 listening sockets")?;
        if let Ok(v6) = self.dump(AF_INET6) {
            all.extend(v6);
        }
        Ok(ports_of(all))
    }

    /// Every listening TCP socket of `family`: its local address and port.
    fn dump(&mut self, family: u8) -> Result<Vec<(IpAddr, u16)>> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::empty(),
                states: StateFlags::LISTEN,
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

    #[test]
    fn only_wildcard_and_loopback_listeners_count_each_port_once() {
        let at = |ip: &str, port| (ip.parse::<IpAddr>().unwrap(), port);
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
    fn proc_net_tcp_gives_the_listening_sockets() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
           0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0\n\
           1: 0100007F:1538 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0\n\
           2: 0340A8C0:2328 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3 1 0\n\
           3: 0100007F:1F90 0100007F:C000 01 00000000:00000000 00:00000000 00000000     0        0 4 1 0\n";
        let v6 = "  sl  local_address                         remote_address                        st\n\
           0: 00000000000000000000000001000000:0BB8 00000000000000000000000000000000:0000 0A 0\n\
           1: 0000000000000000FFFF00000100007F:0FA0 00000000000000000000000000000000:0000 0A 0\n";
        let found: Vec<_> = proc_net_listening(v4)
            .into_iter()
            .chain(proc_net_listening(v6))
            .collect();
        let at = |ip: &str, port| (ip.parse::<IpAddr>().unwrap(), port);
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
    fn the_kernels_listening_sockets_are_read_as_they_come_and_go() {
        let mut diag = SockDiag::open().unwrap();
        let v4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p4 = v4.local_addr().unwrap().port();
        let v6 = std::net::TcpListener::bind("[::1]:0").ok();
        let p6 = v6.as_ref().map(|l| l.local_addr().unwrap().port());
        let now = diag.listening().unwrap();
        assert!(now.contains(&p4), "{p4} not in {now:?}");
        let procfs = from_proc().unwrap();
        assert!(procfs.contains(&p4), "{p4} not in {procfs:?}");
        if let Some(p6) = p6 {
            assert!(now.contains(&p6), "{p6} not in {now:?}");
        }
        // A connected socket is not a listener.
        let client = TcpStream::connect(("127.0.0.1", p4)).unwrap();
        let local = client.local_addr().unwrap().port();
        drop(v4);
        let now = diag.listening().unwrap();
        assert!(!now.contains(&p4), "{p4} still in {now:?}");
        assert!(!now.contains(&local), "{local} in {now:?}");
    }
}
