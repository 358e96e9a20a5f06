//! The responder's relay: a guest's query for a name outside the machine domain goes to the
//! host's resolvers, and their answer back to the guest byte for byte, as libvirt's and
//! Incus's dnsmasq do for their guests. So the gateway can be a guest's one nameserver:
//! `other.machine` and every other name resolve through it.
//!
//! Each query is relayed as it came (same id, same EDNS size) over the transport it came by,
//! from a socket of its own (a fresh ephemeral port, connected to the resolver, so only that
//! resolver's reply is read), to each resolver in turn: the next one is tried when one does
//! not answer within [`UPSTREAM_TIMEOUT`], or answers SERVFAIL or REFUSED. The work is
//! bounded: at most [`MAX_IN_FLIGHT`] queries relayed at once (a query over that gets
//! SERVFAIL at once), each resolver waited for a bounded time, at most
//! [`super::resolv::MAX_UPSTREAMS`] resolvers; and the caller answers SERVFAIL when none
//! answered. A truncated UDP answer is relayed as it is: the guest asks again over TCP.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::resolv;

/// How long one resolver may take to answer: three of them stay under the 5 s a guest's
/// resolver waits before it asks again.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_millis(1500);
/// Queries relayed at once, over UDP and TCP together.
pub const MAX_IN_FLIGHT: usize = 256;
/// The largest DNS message (TCP's length prefix is 16 bits; UDP with EDNS stays below).
const MAX_MESSAGE: usize = 65535;
/// Response codes after which the next resolver is asked.
const SERVFAIL: u8 = 2;
const REFUSED: u8 = 5;

/// Where the resolvers are, looked up at each query (so an edited resolv.conf counts at once).
pub trait Upstreams: Send + Sync + std::fmt::Debug {
    fn servers(&self) -> Vec<SocketAddr>;
}

/// The nameservers of a resolv.conf, without the responder's own address.
#[derive(Debug, Clone)]
pub struct ResolvConf {
    pub path: PathBuf,
    pub responder: Ipv4Addr,
}

impl Upstreams for ResolvConf {
    fn servers(&self) -> Vec<SocketAddr> {
        resolv::upstreams_in(&self.path, self.responder)
    }
}

impl Upstreams for Vec<SocketAddr> {
    fn servers(&self) -> Vec<SocketAddr> {
        self.clone()
    }
}

/// Relays queries to the resolvers `Upstreams` names.
#[derive(Debug)]
pub struct Forwarder {
    upstreams: Arc<dyn Upstreams>,
    timeout: Duration,
    slots: Arc<Semaphore>,
}

/// How a query came, and so how it is relayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

impl Forwarder {
    pub fn new(upstreams: Arc<dyn Upstreams>) -> Self {
        Self::with_limits(upstreams, UPSTREAM_TIMEOUT, MAX_IN_FLIGHT)
    }

    /// A forwarder with another timeout per resolver and cap on queries in flight.
    pub fn with_limits(upstreams: Arc<dyn Upstreams>, timeout: Duration, in_flight: usize) -> Self {
        Self {
            upstreams,
            timeout,
            slots: Arc::new(Semaphore::new(in_flight)),
        }
    }

    /// A slot for one relayed query, held until its answer is sent; `None` when
    /// [`MAX_IN_FLIGHT`] queries are in flight.
    pub fn slot(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
    }

    /// The first useful answer to `query` over UDP (see the module doc); `None` when no
    /// resolver answered.
    pub async fn udp(&self, query: &[u8]) -> Option<Vec<u8>> {
        self.relay(Transport::Udp, query).await
    }

    /// The same over TCP (`query` without its length prefix, and the answer too).
    pub async fn tcp(&self, query: &[u8]) -> Option<Vec<u8>> {
        self.relay(Transport::Tcp, query).await
    }

    async fn relay(&self, transport: Transport, query: &[u8]) -> Option<Vec<u8>> {
        let id = query.get(..2)?;
        let mut last = None;
        for server in self.upstreams.servers() {
            let asked = match transport {
                Transport::Udp => tokio::time::timeout(self.timeout, ask_udp(server, query)).await,
                Transport::Tcp => tokio::time::timeout(self.timeout, ask_tcp(server, query)).await,
            };
            match asked {
                Ok(Ok(answer)) if answers(&answer, id) => {
                    if matches!(answer[3] & 0x0f, SERVFAIL | REFUSED) {
                        last = Some(answer);
                        continue;
                    }
                    return Some(answer);
                }
                Ok(Ok(_)) => tracing::debug!(%server, "DNS: a resolver answered something else"),
                Ok(Err(e)) => tracing::debug!(%server, error = %e, "DNS: relaying a query"),
                Err(_) => tracing::debug!(%server, "DNS: a resolver did not answer in time"),
            }
        }
        last
    }
}

/// One exchange with one resolver over UDP.
async fn ask_udp(server: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let local: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = tokio::net::UdpSocket::bind(local).await?;
    socket.connect(server).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let n = socket.recv(&mut buf).await?;
        // A stray datagram (a late answer to nothing we asked) is not the answer.
        if answers(&buf[..n], &query[..2]) {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

/// One exchange with one resolver over TCP.
async fn ask_tcp(server: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let len = u16::try_from(query.len())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let mut stream = tokio::net::TcpStream::connect(server).await?;
    let mut framed = len.to_be_bytes().to_vec();
    framed.extend_from_slice(query);
    stream.write_all(&framed).await?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await?;
    let mut answer = vec![0u8; u16::from_be_bytes(len) as usize];
    stream.read_exact(&mut answer).await?;
    Ok(answer)
}

/// Whether `message` is a response (with a whole header) to the query with id `id`.
fn answers(message: &[u8], id: &[u8]) -> bool {
    message.len() >= 12 && &message[..2] == id && message[2] & 0x80 != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Message, Query, ResponseCode};
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{Name, RData, Record, RecordType};

    /// A fake resolver's way of answering.
    #[derive(Debug, Clone, Copy)]
    enum Fake {
        /// An A record with this last octet (192.0.2.N).
        Address(u8),
        /// This response code, no answer.
        Code(ResponseCode),
        /// A datagram with another id first, then an A record with this last octet.
        StrayFirst(u8),
    }

    fn response(query: &Message, fake: Fake) -> Message {
        let mut r = Message::response(query.metadata.id, query.metadata.op_code);
        r.metadata.recursion_available = true;
        r.add_query(query.queries[0].clone());
        match fake {
            Fake::Address(n) | Fake::StrayFirst(n) => {
                r.add_answer(Record::from_rdata(
                    query.queries[0].name().clone(),
                    60,
                    RData::A(A(Ipv4Addr::new(192, 0, 2, n))),
                ));
            }
            Fake::Code(code) => r.metadata.response_code = code,
        }
        r
    }

    /// A resolver on loopback answering over UDP as `fake` says.
    async fn fake_udp(fake: Fake) -> SocketAddr {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let at = socket.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
                let query = Message::from_vec(&buf[..n]).unwrap();
                if let Fake::StrayFirst(_) = fake {
                    let mut stray = response(&query, fake);
                    stray.metadata.id = query.metadata.id.wrapping_add(1);
                    socket
                        .send_to(&stray.to_vec().unwrap(), peer)
                        .await
                        .unwrap();
                }
                let answer = response(&query, fake).to_vec().unwrap();
                socket.send_to(&answer, peer).await.unwrap();
            }
        });
        at
    }

    /// A resolver on loopback that reads queries and never answers.
    async fn silent_udp() -> SocketAddr {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let at = socket.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            while socket.recv_from(&mut buf).await.is_ok() {}
        });
        at
    }

    /// A loopback address where nothing listens (UDP or TCP).
    fn closed() -> SocketAddr {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.local_addr().unwrap()
    }

    /// A resolver on loopback answering over TCP as `fake` says, one query per connection.
    async fn fake_tcp(fake: Fake) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut len = [0u8; 2];
                stream.read_exact(&mut len).await.unwrap();
                let mut query = vec![0u8; u16::from_be_bytes(len) as usize];
                stream.read_exact(&mut query).await.unwrap();
                let query = Message::from_vec(&query).unwrap();
                let answer = response(&query, fake).to_vec().unwrap();
                let mut out = (answer.len() as u16).to_be_bytes().to_vec();
                out.extend_from_slice(&answer);
                stream.write_all(&out).await.unwrap();
            }
        });
        at
    }

    fn query(name: &str) -> (Message, Vec<u8>) {
        let mut q = Message::query();
        q.metadata.recursion_desired = true;
        q.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        let bytes = q.to_vec().unwrap();
        (q, bytes)
    }

    fn forwarder(upstreams: Vec<SocketAddr>) -> Forwarder {
        Forwarder::with_limits(Arc::new(upstreams), Duration::from_millis(300), 8)
    }

    fn address(answer: &[u8]) -> Option<Ipv4Addr> {
        Message::from_vec(answer)
            .unwrap()
            .answers
            .iter()
            .find_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
    }

    #[tokio::test]
    async fn an_answer_is_relayed_byte_for_byte_from_the_first_resolver_that_answers() {
        let answering = fake_udp(Fake::Address(10)).await;
        let (q, bytes) = query("www.example.test.");
        let direct = {
            let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            s.send_to(&bytes, answering).await.unwrap();
            let mut buf = [0u8; 1500];
            let n = s.recv(&mut buf).await.unwrap();
            buf[..n].to_vec()
        };
        let relayed = forwarder(vec![answering]).udp(&bytes).await.unwrap();
        assert_eq!(
            relayed, direct,
            "the answer's bytes as the resolver sent them"
        );
        assert_eq!(
            Message::from_vec(&relayed).unwrap().metadata.id,
            q.metadata.id
        );
        // A resolver that says nothing, or is not there, is passed over for the next one.
        let started = std::time::Instant::now();
        let relayed = forwarder(vec![silent_udp().await, closed(), answering])
            .udp(&bytes)
            .await
            .unwrap();
        assert_eq!(address(&relayed), Some(Ipv4Addr::new(192, 0, 2, 10)));
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn servfail_or_refused_asks_the_next_resolver_and_is_relayed_when_all_say_so() {
        let (_, bytes) = query("www.example.test.");
        let refusing = fake_udp(Fake::Code(ResponseCode::Refused)).await;
        let failing = fake_udp(Fake::Code(ResponseCode::ServFail)).await;
        let answering = fake_udp(Fake::Address(11)).await;
        let relayed = forwarder(vec![refusing, failing, answering])
            .udp(&bytes)
            .await
            .unwrap();
        assert_eq!(address(&relayed), Some(Ipv4Addr::new(192, 0, 2, 11)));
        let relayed = forwarder(vec![refusing, failing])
            .udp(&bytes)
            .await
            .unwrap();
        assert_eq!(
            Message::from_vec(&relayed).unwrap().metadata.response_code,
            ResponseCode::ServFail
        );
        // NXDOMAIN is an answer: the next resolver is not asked.
        let nx = fake_udp(Fake::Code(ResponseCode::NXDomain)).await;
        let relayed = forwarder(vec![nx, answering]).udp(&bytes).await.unwrap();
        assert_eq!(
            Message::from_vec(&relayed).unwrap().metadata.response_code,
            ResponseCode::NXDomain
        );
    }

    #[tokio::test]
    async fn no_answer_from_any_resolver_is_none_within_the_bound() {
        let (_, bytes) = query("www.example.test.");
        let started = std::time::Instant::now();
        let none = forwarder(vec![silent_udp().await, closed(), silent_udp().await])
            .udp(&bytes)
            .await;
        assert_eq!(none, None);
        // Two silent resolvers, 300 ms each.
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(forwarder(Vec::new()).udp(&bytes).await, None);
        assert_eq!(forwarder(vec![closed()]).tcp(&bytes).await, None);
        // Not even a header: nothing is sent.
        assert_eq!(
            forwarder(vec![fake_udp(Fake::Address(1)).await])
                .udp(b"\x01")
                .await,
            None
        );
    }

    #[tokio::test]
    async fn a_stray_datagram_is_not_taken_for_the_answer() {
        let (_, bytes) = query("www.example.test.");
        let stray = fake_udp(Fake::StrayFirst(12)).await;
        let relayed = forwarder(vec![stray]).udp(&bytes).await.unwrap();
        assert_eq!(
            Message::from_vec(&relayed).unwrap().metadata.id,
            Message::from_vec(&bytes).unwrap().metadata.id
        );
        assert_eq!(address(&relayed), Some(Ipv4Addr::new(192, 0, 2, 12)));
    }

    #[tokio::test]
    async fn tcp_queries_are_relayed_over_tcp() {
        let (_, bytes) = query("big.example.test.");
        let answering = fake_tcp(Fake::Address(13)).await;
        let relayed = forwarder(vec![closed(), answering])
            .tcp(&bytes)
            .await
            .unwrap();
        assert_eq!(address(&relayed), Some(Ipv4Addr::new(192, 0, 2, 13)));
    }

    #[test]
    fn queries_in_flight_are_capped() {
        let f = Forwarder::with_limits(Arc::new(Vec::new()), UPSTREAM_TIMEOUT, 2);
        let a = f.slot().expect("a first slot");
        let _b = f.slot().expect("a second slot");
        assert!(f.slot().is_none(), "a third query in flight");
        drop(a);
        assert!(
            f.slot().is_some(),
            "a slot is free again once a query is answered"
        );
    }
}
