//! The machine names' DNS responder: `NAME.DOMAIN` (`dev.machine`) is the address of machine
//! `NAME`, answered on the bridge's gateway address, UDP and TCP port 53, from the lease book
//! as it is at the moment of the query (no copy to go stale: a create, rm or rename is seen by
//! the next query). Messages are parsed and written by `hickory-proto`. The gateway is each
//! guest's one nameserver (its resolv.conf).
//!
//! What it answers: authoritatively for the domain. A machine's A record; AAAA and other types
//! NOERROR with no answer (the machine network is IPv4 only); NXDOMAIN for a name of the
//! domain that is no machine with an address *that the asker may know*. Who asks is told by
//! the query's source address: the host (the gateway itself or loopback) knows every machine;
//! a machine (its leased address) knows itself and the machines of its own owner, as the
//! bridge's isolation lets it reach only those; any other source is REFUSED. So no guest
//! learns that another owner's machine exists. The reverse names of the machine network's
//! addresses (`2.64.168.192.in-addr.arpa`, PTR `NAME.DOMAIN`) are answered the same way and
//! never relayed (a private address is nobody else's to answer, nor to hear about). A name
//! outside the domain is relayed to the
//! host's resolvers when a machine asks ([`super::dns_forward`], SERVFAIL when none
//! answers), and REFUSED to the host (it has its own resolver) and to anyone else (the
//! responder is no open resolver).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, PTR};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::dns_forward::Forwarder;
use super::leases::LeaseBook;
use super::subnet::Subnet;

/// The port the responder listens on (the standard one: resolvers cannot be given another).
pub const DNS_PORT: u16 = 53;
/// Answers are not cached: a rename or rm is seen at once.
const TTL: u32 = 0;
/// Longest a TCP client may stay idle between queries, and connections served at once.
const TCP_IDLE: Duration = Duration::from_secs(10);
const TCP_CONNECTIONS: usize = 64;

/// A machine that has a name in DNS: its address and its owner (when known).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub ip: Ipv4Addr,
    pub owner: Option<u32>,
}

/// Where the responder looks names up, at each query.
pub trait Directory: Send + Sync + std::fmt::Debug {
    /// The machine called `name`.
    fn entry(&self, name: &str) -> Option<Entry>;
    /// The machine holding `ip`, with its entry.
    fn at(&self, ip: Ipv4Addr) -> Option<(String, Entry)>;
}

/// The live lease book: names, addresses and owners as `Network` keeps them.
#[derive(Debug, Clone)]
pub struct Leased(pub Arc<Mutex<LeaseBook>>);

impl Directory for Leased {
    fn entry(&self, name: &str) -> Option<Entry> {
        let book = self.0.lock().unwrap_or_else(|p| p.into_inner());
        book.get(name).map(|ip| Entry {
            ip,
            owner: book.owner(name),
        })
    }
    fn at(&self, ip: Ipv4Addr) -> Option<(String, Entry)> {
        let book = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let name = book.names().find(|n| book.get(n) == Some(ip))?.to_string();
        let owner = book.owner(&name);
        Some((name, Entry { ip, owner }))
    }
}

impl Directory for BTreeMap<String, Entry> {
    fn entry(&self, name: &str) -> Option<Entry> {
        self.get(name).copied()
    }
    fn at(&self, ip: Ipv4Addr) -> Option<(String, Entry)> {
        self.iter()
            .find(|(_, e)| e.ip == ip)
            .map(|(n, e)| (n.clone(), *e))
    }
}

/// Who sent a query, told by its source address.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Asker {
    /// The host: knows every machine.
    Host,
    /// A machine: knows itself and the machines of its owner.
    Machine { name: String, owner: Option<u32> },
    /// Anything else (a packet routed in from elsewhere): told nothing.
    Stranger,
}

impl Asker {
    /// Whether the asker may learn that machine `name` exists: the host every machine, a
    /// machine itself and its owner's machines.
    fn may_know(&self, name: &str, entry: &Entry) -> bool {
        match self {
            Asker::Host => true,
            Asker::Machine {
                name: own,
                owner: own_owner,
            } => own == name || (own_owner.is_some() && *own_owner == entry.owner),
            Asker::Stranger => false,
        }
    }
}

/// What to do with one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handling {
    /// Send these bytes back.
    Answer(Vec<u8>),
    /// A machine asked for a name outside the domain: relay the query to the host's
    /// resolvers, and send `servfail` back when none answers.
    Forward { servfail: Vec<u8> },
    /// Not worth an answer (a response, or garbage without even a header).
    Ignore,
}

/// The zone the responder serves.
#[derive(Debug, Clone)]
pub struct Zone {
    /// Lower case, no trailing dot.
    domain: String,
    /// The machine network: its gateway is the host, its addresses' reverse names are ours.
    subnet: Subnet,
}

impl Zone {
    pub fn new(domain: &str, subnet: Subnet) -> Self {
        Self {
            domain: domain.trim_end_matches('.').to_ascii_lowercase(),
            subnet,
        }
    }

    pub fn domain(&self) -> &str {
        &self.domain
    }

    fn asker(&self, source: IpAddr, directory: &dyn Directory) -> Asker {
        let source = match source {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None if v6.is_loopback() => return Asker::Host,
                None => return Asker::Stranger,
            },
            v4 => v4,
        };
        let IpAddr::V4(v4) = source else {
            return Asker::Stranger;
        };
        if v4.is_loopback() || v4 == self.subnet.gateway() {
            return Asker::Host;
        }
        match directory.at(v4) {
            Some((name, entry)) => Asker::Machine {
                name,
                owner: entry.owner,
            },
            None => Asker::Stranger,
        }
    }

    /// The address of the machine network a reverse name (`4.64.168.192.in-addr.arpa.`)
    /// asks about; `None` for any other name.
    fn reverse_of(&self, qname: &Name) -> Option<Ipv4Addr> {
        let text = qname.to_ascii().to_ascii_lowercase();
        let digits = text.trim_end_matches('.').strip_suffix(".in-addr.arpa")?;
        let octets: Vec<u8> = digits
            .split('.')
            .map(|d| d.parse().ok().filter(|_| !d.starts_with('0') || d == "0"))
            .collect::<Option<_>>()?;
        let [d, c, b, a] = octets.as_slice() else {
            return None;
        };
        let ip = Ipv4Addr::new(*a, *b, *c, *d);
        self.subnet.contains(ip).then_some(ip)
    }

    /// The machine name a query name asks about: `Some(Some(name))` for `NAME.DOMAIN`,
    /// `Some(None)` for the domain itself or a deeper name in it, `None` outside the domain.
    fn machine_of(&self, qname: &Name) -> Option<Option<String>> {
        let text = qname.to_ascii().to_ascii_lowercase();
        let text = text.trim_end_matches('.');
        if text == self.domain {
            return Some(None);
        }
        let label = text.strip_suffix(&self.domain)?.strip_suffix('.')?;
        Some((!label.contains('.')).then(|| label.to_string()))
    }

    /// What to do with one message from `source`.
    pub fn handle(&self, request: &[u8], source: IpAddr, directory: &dyn Directory) -> Handling {
        let request = match Message::from_vec(request) {
            Ok(m) => m,
            Err(_) => {
                // A header at least: answer FORMERR to its id.
                let (Some(&hi), Some(&lo)) = (request.first(), request.get(1)) else {
                    return Handling::Ignore;
                };
                if request.len() < 12 || request[2] & 0x80 != 0 {
                    return Handling::Ignore;
                }
                let id = u16::from_be_bytes([hi, lo]);
                return encoded(Message::error_msg(id, OpCode::Query, ResponseCode::FormErr));
            }
        };
        if request.metadata.message_type != MessageType::Query {
            return Handling::Ignore;
        }
        match self.respond(&request, source, directory) {
            Reply::Local(response) => encoded(response),
            Reply::Forward => {
                let mut servfail = reply_to(&request, true);
                servfail.metadata.response_code = ResponseCode::ServFail;
                match servfail.to_vec() {
                    Ok(servfail) => Handling::Forward { servfail },
                    Err(_) => Handling::Ignore,
                }
            }
        }
    }

    fn respond(&self, request: &Message, source: IpAddr, directory: &dyn Directory) -> Reply {
        let asker = self.asker(source, directory);
        let recursive = matches!(asker, Asker::Machine { .. });
        let mut response = Message::response(request.metadata.id, request.metadata.op_code);
        response.metadata.recursion_desired = request.metadata.recursion_desired;
        response.metadata.recursion_available = recursive;
        if request.metadata.op_code != OpCode::Query {
            response.metadata.response_code = ResponseCode::NotImp;
            return Reply::Local(response);
        }
        let [query] = request.queries.as_slice() else {
            response.metadata.response_code = ResponseCode::FormErr;
            return Reply::Local(response);
        };
        response.add_query(query.clone());
        if let Some(ip) = self.reverse_of(query.name()) {
            // Never relayed: the machine network's addresses are nobody else's to answer.
            if asker == Asker::Stranger {
                response.metadata.response_code = ResponseCode::Refused;
                return Reply::Local(response);
            }
            response.metadata.authoritative = true;
            let named = directory
                .at(ip)
                .filter(|(name, entry)| asker.may_know(name, entry));
            let Some((name, _)) = named else {
                response.metadata.response_code = ResponseCode::NXDomain;
                return Reply::Local(response);
            };
            if matches!(query.query_type(), RecordType::PTR | RecordType::ANY)
                && let Ok(target) = Name::from_ascii(format!("{name}.{}.", self.domain))
            {
                response.add_answer(Record::from_rdata(
                    query.name().clone(),
                    TTL,
                    RData::PTR(PTR(target)),
                ));
            }
            return Reply::Local(response);
        }
        let Some(asked) = self.machine_of(query.name()) else {
            if recursive {
                return Reply::Forward;
            }
            response.metadata.response_code = ResponseCode::Refused;
            return Reply::Local(response);
        };
        if asker == Asker::Stranger {
            response.metadata.response_code = ResponseCode::Refused;
            return Reply::Local(response);
        }
        response.metadata.authoritative = true;
        let Some(name) = asked else {
            // The domain itself exists (with no address); deeper names do not.
            if query.name().num_labels() as usize != self.domain.split('.').count() {
                response.metadata.response_code = ResponseCode::NXDomain;
            }
            return Reply::Local(response);
        };
        let entry = directory
            .entry(&name)
            .filter(|entry| asker.may_know(&name, entry));
        let Some(entry) = entry else {
            response.metadata.response_code = ResponseCode::NXDomain;
            return Reply::Local(response);
        };
        if matches!(query.query_type(), RecordType::A | RecordType::ANY) {
            response.add_answer(Record::from_rdata(
                query.name().clone(),
                TTL,
                RData::A(A(entry.ip)),
            ));
        }
        Reply::Local(response)
    }
}

/// The responder's own answer, or a query to relay.
enum Reply {
    Local(Message),
    Forward,
}

/// An empty response to `request`, its question echoed.
fn reply_to(request: &Message, recursion_available: bool) -> Message {
    let mut response = Message::response(request.metadata.id, request.metadata.op_code);
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.recursion_available = recursion_available;
    for query in &request.queries {
        response.add_query(query.clone());
    }
    response
}

fn encoded(message: Message) -> Handling {
    match message.to_vec() {
        Ok(bytes) => Handling::Answer(bytes),
        Err(_) => Handling::Ignore,
    }
}

/// What the serving tasks share: the zone, where names are looked up, and the relay.
#[derive(Debug)]
pub struct Responder {
    pub zone: Zone,
    pub directory: Arc<dyn Directory>,
    pub forwarder: Forwarder,
}

impl Responder {
    fn handle(&self, request: &[u8], source: IpAddr) -> Handling {
        self.zone.handle(request, source, &*self.directory)
    }
}

/// Serves DNS over UDP on `socket` until the task is dropped; each relayed query on a task of
/// its own, holding one of the forwarder's slots.
pub async fn serve_udp(socket: tokio::net::UdpSocket, responder: Arc<Responder>) {
    let socket = Arc::new(socket);
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, peer) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "DNS: receiving a query");
                continue;
            }
        };
        let answer = match responder.handle(&buf[..n], peer.ip()) {
            Handling::Answer(answer) => answer,
            Handling::Ignore => continue,
            Handling::Forward { servfail } => match responder.forwarder.slot() {
                None => servfail,
                Some(slot) => {
                    let (socket, responder, query) =
                        (socket.clone(), responder.clone(), buf[..n].to_vec());
                    tokio::spawn(async move {
                        let _slot = slot;
                        let answer = responder.forwarder.udp(&query).await.unwrap_or(servfail);
                        if let Err(e) = socket.send_to(&answer, peer).await {
                            tracing::debug!(%peer, error = %e, "DNS: sending an answer");
                        }
                    });
                    continue;
                }
            },
        };
        if let Err(e) = socket.send_to(&answer, peer).await {
            tracing::debug!(%peer, error = %e, "DNS: sending an answer");
        }
    }
}

/// Serves DNS over TCP (two-byte length before each message) on `listener` until the task
/// is dropped; at most [`TCP_CONNECTIONS`] clients at once, each closed when idle.
pub async fn serve_tcp(listener: tokio::net::TcpListener, responder: Arc<Responder>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(TCP_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "DNS: accepting a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let responder = responder.clone();
        tokio::spawn(async move {
            let _permit = permit;
            serve_tcp_client(stream, peer, &responder).await;
        });
    }
}

async fn serve_tcp_client(
    mut stream: tokio::net::TcpStream,
    peer: SocketAddr,
    responder: &Responder,
) {
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let mut query = vec![0u8; u16::from_be_bytes(len) as usize];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut query)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let answer = match responder.handle(&query, peer.ip()) {
            Handling::Answer(answer) => answer,
            Handling::Ignore => return,
            Handling::Forward { servfail } => match responder.forwarder.slot() {
                None => servfail,
                Some(_slot) => responder.forwarder.tcp(&query).await.unwrap_or(servfail),
            },
        };
        let Ok(len) = u16::try_from(answer.len()) else {
            return;
        };
        let mut out = len.to_be_bytes().to_vec();
        out.extend_from_slice(&answer);
        if stream.write_all(&out).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;

    fn subnet() -> Subnet {
        "192.168.64.0/24".parse().unwrap()
    }

    fn directory() -> BTreeMap<String, Entry> {
        let entry = |last, owner| Entry {
            ip: Ipv4Addr::new(192, 168, 64, last),
            owner: Some(owner),
        };
        BTreeMap::from([
            ("dev".to_string(), entry(2, 1000)),
            ("db".to_string(), entry(3, 1000)),
            ("theirs".to_string(), entry(4, 1001)),
        ])
    }

    fn ask(name: &str, kind: RecordType, from: &str) -> Message {
        let mut q = Message::query();
        q.metadata.recursion_desired = true;
        q.add_query(Query::query(Name::from_ascii(name).unwrap(), kind));
        let handled = Zone::new("machine", subnet()).handle(
            &q.to_vec().unwrap(),
            from.parse().unwrap(),
            &directory(),
        );
        let Handling::Answer(bytes) = handled else {
            panic!("no answer of its own to {name} from {from}: {handled:?}");
        };
        let answer = Message::from_vec(&bytes).unwrap();
        assert_eq!(answer.metadata.id, q.metadata.id);
        assert_eq!(answer.metadata.message_type, MessageType::Response);
        // Recursion is offered to machines only.
        let machine = directory()
            .values()
            .any(|e| IpAddr::V4(e.ip) == from.parse::<IpAddr>().unwrap());
        assert_eq!(answer.metadata.recursion_available, machine);
        answer
    }

    fn addresses(m: &Message) -> Vec<Ipv4Addr> {
        m.answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_host_resolves_every_machine_to_its_address() {
        for from in ["192.168.64.1", "127.0.0.1", "::1"] {
            let a = ask("dev.machine.", RecordType::A, from);
            assert_eq!(a.metadata.response_code, ResponseCode::NoError);
            assert!(a.metadata.authoritative);
            assert_eq!(addresses(&a), [Ipv4Addr::new(192, 168, 64, 2)]);
            let other = ask("theirs.machine", RecordType::A, from);
            assert_eq!(addresses(&other), [Ipv4Addr::new(192, 168, 64, 4)]);
        }
        // Names are case-insensitive, and the question is echoed as asked.
        let a = ask("DB.Machine.", RecordType::A, "127.0.0.1");
        assert_eq!(addresses(&a), [Ipv4Addr::new(192, 168, 64, 3)]);
        assert_eq!(a.queries[0].name().to_ascii(), "DB.Machine.");
    }

    #[test]
    fn no_ipv6_address_is_an_empty_answer_not_an_error() {
        let a = ask("dev.machine.", RecordType::AAAA, "192.168.64.1");
        assert_eq!(a.metadata.response_code, ResponseCode::NoError);
        assert!(a.answers.is_empty());
        let apex = ask("machine.", RecordType::A, "192.168.64.1");
        assert_eq!(apex.metadata.response_code, ResponseCode::NoError);
        assert!(apex.answers.is_empty());
    }

    #[test]
    fn unknown_names_in_the_domain_do_not_exist() {
        for name in ["nope.machine.", "a.dev.machine."] {
            let a = ask(name, RecordType::A, "192.168.64.1");
            assert_eq!(a.metadata.response_code, ResponseCode::NXDomain, "{name}");
            assert!(a.answers.is_empty());
        }
    }

    #[test]
    fn names_outside_the_domain_are_refused_to_the_host_without_recursion() {
        for name in ["example.com.", "dev.", "machine.example.", "devmachine."] {
            let a = ask(name, RecordType::A, "192.168.64.1");
            assert_eq!(a.metadata.response_code, ResponseCode::Refused, "{name}");
            assert!(a.answers.is_empty());
        }
    }

    #[test]
    fn a_machines_query_outside_the_domain_is_relayed_with_servfail_ready() {
        let zone = Zone::new("machine", subnet());
        for name in ["example.com.", "dev.", "devmachine."] {
            let mut q = Message::query();
            q.metadata.recursion_desired = true;
            q.add_query(Query::query(
                Name::from_ascii(name).unwrap(),
                RecordType::AAAA,
            ));
            let handled = zone.handle(
                &q.to_vec().unwrap(),
                "192.168.64.2".parse().unwrap(),
                &directory(),
            );
            let Handling::Forward { servfail } = handled else {
                panic!("{name} is not relayed: {handled:?}");
            };
            let servfail = Message::from_vec(&servfail).unwrap();
            assert_eq!(servfail.metadata.id, q.metadata.id);
            assert_eq!(servfail.metadata.response_code, ResponseCode::ServFail);
            assert_eq!(servfail.queries, q.queries);
        }
        // Strangers are told nothing, not even through the relay.
        let mut q = Message::query();
        q.add_query(Query::query(
            Name::from_ascii("example.com.").unwrap(),
            RecordType::A,
        ));
        let stranger = zone.handle(
            &q.to_vec().unwrap(),
            "192.168.64.77".parse().unwrap(),
            &directory(),
        );
        let Handling::Answer(bytes) = stranger else {
            panic!("{stranger:?}");
        };
        assert_eq!(
            Message::from_vec(&bytes).unwrap().metadata.response_code,
            ResponseCode::Refused
        );
    }

    #[test]
    fn a_machine_sees_its_owners_machines_only() {
        // dev (uid 1000) asks.
        let own = ask("db.machine.", RecordType::A, "192.168.64.2");
        assert_eq!(addresses(&own), [Ipv4Addr::new(192, 168, 64, 3)]);
        let itself = ask("dev.machine.", RecordType::A, "192.168.64.2");
        assert_eq!(addresses(&itself), [Ipv4Addr::new(192, 168, 64, 2)]);
        // Another owner's machine is as absent as one that does not exist.
        let theirs = ask("theirs.machine.", RecordType::A, "192.168.64.2");
        assert_eq!(theirs.metadata.response_code, ResponseCode::NXDomain);
        assert!(theirs.answers.is_empty());
        let back = ask("dev.machine.", RecordType::A, "192.168.64.4");
        assert_eq!(back.metadata.response_code, ResponseCode::NXDomain);
    }

    fn ptr(m: &Message) -> Vec<String> {
        m.answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::PTR(p) => Some(p.0.to_ascii()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn reverse_names_of_the_machine_network_are_answered_here_owner_scoped() {
        let own = ask(
            "3.64.168.192.in-addr.arpa.",
            RecordType::PTR,
            "192.168.64.2",
        );
        assert_eq!(own.metadata.response_code, ResponseCode::NoError);
        assert!(own.metadata.authoritative);
        assert_eq!(ptr(&own), ["db.machine."]);
        let host = ask("4.64.168.192.in-addr.arpa.", RecordType::PTR, "127.0.0.1");
        assert_eq!(ptr(&host), ["theirs.machine."]);
        // Another owner's machine, a free address and the gateway: as if absent.
        for name in [
            "4.64.168.192.in-addr.arpa.",
            "77.64.168.192.in-addr.arpa.",
            "1.64.168.192.in-addr.arpa.",
        ] {
            let a = ask(name, RecordType::PTR, "192.168.64.2");
            assert_eq!(a.metadata.response_code, ResponseCode::NXDomain, "{name}");
            assert!(a.answers.is_empty());
        }
        // Outside the subnet, or not an address: relayed for a machine like any name.
        let zone = Zone::new("machine", subnet());
        for name in [
            "4.65.168.192.in-addr.arpa.",
            "64.168.192.in-addr.arpa.",
            "03.64.168.192.in-addr.arpa.",
        ] {
            let mut q = Message::query();
            q.add_query(Query::query(
                Name::from_ascii(name).unwrap(),
                RecordType::PTR,
            ));
            let handled = zone.handle(
                &q.to_vec().unwrap(),
                "192.168.64.2".parse().unwrap(),
                &directory(),
            );
            assert!(
                matches!(handled, Handling::Forward { .. }),
                "{name}: {handled:?}"
            );
        }
    }

    proptest::proptest! {
        /// Whatever a guest sends (garbage, or a real query with bytes flipped), the responder
        /// neither panics nor answers another id, and relays only for a machine.
        #[test]
        fn any_message_is_answered_sanely_or_ignored(
            junk in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
            flips in proptest::collection::vec((0usize..64, proptest::num::u8::ANY), 0..6),
            from in proptest::sample::select(vec!["127.0.0.1", "192.168.64.2", "192.168.64.77"]),
        ) {
            let zone = Zone::new("machine", subnet());
            let mut q = Message::query();
            q.add_query(Query::query(Name::from_ascii("db.machine.").unwrap(), RecordType::A));
            let mut query = q.to_vec().unwrap();
            for (at, value) in flips {
                if let Some(b) = query.get_mut(at) {
                    *b = value;
                }
            }
            for message in [junk, query] {
                let source: IpAddr = from.parse().unwrap();
                match zone.handle(&message, source, &directory()) {
                    Handling::Answer(bytes) => {
                        proptest::prop_assert_eq!(&bytes[..2], &message[..2]);
                        proptest::prop_assert!(bytes[2] & 0x80 != 0, "a response");
                    }
                    Handling::Forward { servfail } => {
                        proptest::prop_assert_eq!(from, "192.168.64.2");
                        proptest::prop_assert_eq!(&servfail[..2], &message[..2]);
                    }
                    Handling::Ignore => {}
                }
            }
        }
    }

    #[test]
    fn strangers_are_refused() {
        // An address of the subnet nobody holds, and one from elsewhere.
        for from in ["192.168.64.77", "10.0.0.5", "2001:db8::1"] {
            let a = ask("dev.machine.", RecordType::A, from);
            assert_eq!(a.metadata.response_code, ResponseCode::Refused, "{from}");
            assert!(a.answers.is_empty());
        }
    }

    #[test]
    fn garbage_gets_formerr_or_nothing() {
        let zone = Zone::new("machine", subnet());
        let host: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(zone.handle(b"", host, &directory()), Handling::Ignore);
        assert_eq!(zone.handle(b"\x12", host, &directory()), Handling::Ignore);
        let mut junk = vec![0x12, 0x34, 0x01, 0x00, 0x00, 0x05];
        junk.extend_from_slice(&[0xff; 20]);
        let Handling::Answer(bytes) = zone.handle(&junk, host, &directory()) else {
            panic!("no FORMERR");
        };
        let a = Message::from_vec(&bytes).unwrap();
        assert_eq!(a.metadata.id, 0x1234);
        assert_eq!(a.metadata.response_code, ResponseCode::FormErr);
        // A response is never answered (no loops between responders).
        let mut r = Message::response(7, OpCode::Query);
        r.add_query(Query::query(
            Name::from_ascii("dev.machine.").unwrap(),
            RecordType::A,
        ));
        assert_eq!(
            zone.handle(&r.to_vec().unwrap(), host, &directory()),
            Handling::Ignore
        );
    }

    #[test]
    fn another_domain_can_be_configured() {
        let zone = Zone::new("VM.Internal.", subnet());
        let mut q = Message::query();
        q.add_query(Query::query(
            Name::from_ascii("dev.vm.internal.").unwrap(),
            RecordType::A,
        ));
        let Handling::Answer(bytes) = zone.handle(
            &q.to_vec().unwrap(),
            "127.0.0.1".parse().unwrap(),
            &directory(),
        ) else {
            panic!("no answer");
        };
        let a = Message::from_vec(&bytes).unwrap();
        assert_eq!(addresses(&a), [Ipv4Addr::new(192, 168, 64, 2)]);
    }

    #[tokio::test]
    async fn udp_and_tcp_clients_get_answers_from_the_live_book() {
        let book = Arc::new(Mutex::new(LeaseBook::new(subnet())));
        let responder = Arc::new(Responder {
            zone: Zone::new("machine", subnet()),
            directory: Arc::new(Leased(book.clone())),
            forwarder: Forwarder::new(Arc::new(Vec::new())),
        });
        let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (udp_addr, tcp_addr) = (udp.local_addr().unwrap(), tcp.local_addr().unwrap());
        let served = [
            tokio::spawn(serve_udp(udp, responder.clone())),
            tokio::spawn(serve_tcp(tcp, responder)),
        ];
        let query = |name: &str| {
            let mut q = Message::query();
            q.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
            q.to_vec().unwrap()
        };
        let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let udp_ask = |name: &'static str| {
            let client = &client;
            let q = query(name);
            async move {
                client.send_to(&q, udp_addr).await.unwrap();
                let mut buf = [0u8; 512];
                let n = client.recv(&mut buf).await.unwrap();
                Message::from_vec(&buf[..n]).unwrap()
            }
        };
        assert_eq!(
            udp_ask("dev.machine.").await.metadata.response_code,
            ResponseCode::NXDomain
        );
        // A lease taken now is answered at the next query.
        let ip = {
            let mut b = book.lock().unwrap();
            let ip = b.lease("dev").unwrap();
            b.set_owner("dev", 1000);
            ip
        };
        assert_eq!(addresses(&udp_ask("dev.machine.").await), [ip]);
        // TCP: two queries on one connection.
        let mut stream = tokio::net::TcpStream::connect(tcp_addr).await.unwrap();
        for _ in 0..2 {
            let q = query("dev.machine.");
            let mut framed = (q.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(&q);
            stream.write_all(&framed).await.unwrap();
            let mut len = [0u8; 2];
            stream.read_exact(&mut len).await.unwrap();
            let mut answer = vec![0u8; u16::from_be_bytes(len) as usize];
            stream.read_exact(&mut answer).await.unwrap();
            assert_eq!(addresses(&Message::from_vec(&answer).unwrap()), [ip]);
        }
        book.lock().unwrap().release("dev");
        assert_eq!(
            udp_ask("dev.machine.").await.metadata.response_code,
            ResponseCode::NXDomain
        );
        for task in served {
            task.abort();
        }
    }
}
