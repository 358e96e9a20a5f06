//! The host's loopback forwarded to the guests' listening ports, over vsock: so a server a
//! user starts in a machine answers at `http://127.0.0.1:PORT` on the host, with no flag,
//! and with `--network none` too.
//!
//! One task per running VM ([`PortForwards::set`]) keeps a `WatchPorts` session open with
//! its agent, which reports the guest's listening TCP ports and served UDP ports at once and
//! after each change; for each port the host listens on the forward address (`[network]
//! forward-address`, 127.0.0.1, and `::1` with it when the host has IPv6) at the same port
//! and protocol, or `10000 + port` below 1024 (`container_api::ports::default_host_port`),
//! plus the machine's published ports whatever the guest listens on. Each accepted TCP
//! connection is a `Forward` session with the agent, which connects to the port on the
//! guest's loopback; bytes are copied both ways. Each UDP client is a `ForwardUdp` session
//! ([`udp`]).
//!
//! Invariants: a host port another program (or another machine) holds is never taken over:
//! it is shown refused, with the reason, and tried again each second, so it is forwarded
//! once it is free. The host listens only while the VM is up: the task ends, closing every
//! listener, within a second of the VM stopping (or starting to stop). A service that
//! restarts opens the session again for each adopted VM, and the agent's first report
//! brings every forward back.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use container_agent_proto as proto;
use container_api::machine::MachineState;
use container_api::ports::{PortForward, PortState, Protocol, Publish, default_host_port};
use proto::client::GuestPorts;
use tokio::task::JoinHandle;

use super::Runtime;

mod udp;

/// How often the forwarder looks at the VM's state and retries refused host ports.
const TICK: Duration = Duration::from_secs(1);
/// How long a forwarded connection may take to reach the guest port.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The buffer of each direction of a forwarded connection.
const COPY_BUFFER: usize = 256 * 1024;

/// What to forward for one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortPolicy {
    /// Follow the guest's listening ports (`forward-ports=on`).
    pub watch: bool,
    /// Host ports forwarded whatever the guest listens on.
    pub publish: Vec<Publish>,
    /// The host address listened on.
    pub address: IpAddr,
}

/// The forwarders of every running VM, by VM id.
#[derive(Debug)]
pub struct PortForwards {
    runtime: Runtime,
    vms: Mutex<HashMap<String, Forwarder>>,
}

#[derive(Debug)]
struct Forwarder {
    task: JoinHandle<()>,
    table: Arc<Mutex<Table>>,
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
        lock(&self.table).entries.clear();
    }
}

impl PortForwards {
    pub fn new(runtime: Runtime) -> Self {
        Self {
            runtime,
            vms: Mutex::default(),
        }
    }

    /// Forwards as `policy` says for the VM `id` from now until it stops, replacing what
    /// was forwarded for it before; `None` stops forwarding.
    pub fn set(&self, id: &str, policy: Option<PortPolicy>) {
        let mut vms = self.lock();
        // The old listeners close before the new ones are bound.
        vms.remove(id);
        let Some(policy) = policy else { return };
        let table = Arc::new(Mutex::new(Table::new(id, policy.address)));
        let task = tokio::spawn(run(
            self.runtime.clone(),
            id.to_string(),
            policy,
            table.clone(),
        ));
        vms.insert(id.to_string(), Forwarder { task, table });
    }

    /// The ports forwarded (or refused) for the VM `id` now, by host port.
    pub fn list(&self, id: &str) -> Vec<PortForward> {
        match self.lock().get(id) {
            Some(f) => lock(&f.table).list(),
            None => Vec::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Forwarder>> {
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn lock(table: &Mutex<Table>) -> std::sync::MutexGuard<'_, Table> {
    table.lock().unwrap_or_else(|p| p.into_inner())
}

/// Follows the VM's ports until it stops.
async fn run(runtime: Runtime, id: String, policy: PortPolicy, table: Arc<Mutex<Table>>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut watch: Option<proto::client::PortWatch> = None;
    let mut reported = GuestPorts::default();
    // A session is opened again no sooner than a tick after the last one ended.
    let mut next_attempt = tokio::time::Instant::now();
    // An agent that refuses to report (one from before port reports) is asked once per boot.
    let mut unsupported = false;
    loop {
        let state = runtime.status(&id);
        if matches!(state, MachineState::Stopped | MachineState::Stopping) {
            break;
        }
        if let Ok(socket) = runtime.agent_socket(&id) {
            lock(&table).socket = Some(socket.clone());
            let due = tokio::time::Instant::now() >= next_attempt;
            if policy.watch && watch.is_none() && !unsupported && due {
                next_attempt = tokio::time::Instant::now() + TICK;
                match open_watch(&socket).await {
                    Ok(w) => watch = Some(w),
                    Err(e) => {
                        tracing::debug!(machine = %id, error = %e, "cannot follow the machine's ports yet")
                    }
                }
            }
        }
        let wanted = desired(&policy.publish, &reported);
        lock(&table).reconcile(&wanted);
        tokio::select! {
            next = async { watch.as_mut().expect("guarded").next().await }, if watch.is_some() => {
                match next {
                    Ok(ports) => {
                        tracing::debug!(machine = %id, ?ports, "the guest's listening ports");
                        reported = ports;
                    }
                    Err(proto::ProtoError::Agent { message, .. }) => {
                        tracing::warn!(machine = %id, %message, "the machine's agent cannot report its ports (restart the machine to update it); only published ports are forwarded");
                        unsupported = true;
                        watch = None;
                    }
                    Err(e) => {
                        // The VM is stopping, or the agent went away: the next tick tells.
                        tracing::debug!(machine = %id, error = %e, "the port report session ended");
                        watch = None;
                        next_attempt = tokio::time::Instant::now() + TICK;
                    }
                }
            }
            _ = tick.tick() => {}
        }
    }
    lock(&table).entries.clear();
    tracing::debug!(machine = %id, "port forwarding stopped");
}

async fn open_watch(
    socket: &std::path::Path,
) -> Result<proto::client::PortWatch, proto::ProtoError> {
    tokio::time::timeout(CONNECT_TIMEOUT, async {
        proto::client::AgentClient::connect(socket, proto::PORT)
            .await?
            .watch_ports()
            .await
    })
    .await
    .map_err(|_| proto::ProtoError::Timeout)?
}

/// A host port: its number and protocol (TCP 5353 and UDP 5353 are two).
type HostPort = (u16, Protocol);

/// What should be forwarded, by host port: the published ports, then each reported guest
/// port not published already (same protocol) at its default host port, unless a published
/// one holds it.
fn desired(publish: &[Publish], reported: &GuestPorts) -> BTreeMap<HostPort, Want> {
    let mut wanted: BTreeMap<HostPort, Want> = publish
        .iter()
        .map(|p| {
            let want = Want {
                guest: p.guest_port,
                published: true,
            };
            ((p.host_port, p.protocol), want)
        })
        .collect();
    let published: BTreeSet<(u16, Protocol)> =
        publish.iter().map(|p| (p.guest_port, p.protocol)).collect();
    let guest_ports = (reported.tcp.iter().map(|&p| (p, Protocol::Tcp)))
        .chain(reported.udp.iter().map(|&p| (p, Protocol::Udp)));
    for (guest, protocol) in guest_ports {
        if published.contains(&(guest, protocol)) {
            continue;
        }
        let want = Want {
            guest,
            published: false,
        };
        wanted
            .entry((default_host_port(guest), protocol))
            .or_insert(want);
    }
    wanted
}

/// One host port's purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Want {
    guest: u16,
    published: bool,
}

/// A VM's host ports and their listeners.
#[derive(Debug)]
struct Table {
    id: String,
    address: IpAddr,
    /// Where the VM's agent is reached, once known.
    socket: Option<PathBuf>,
    entries: BTreeMap<HostPort, Entry>,
}

#[derive(Debug)]
struct Entry {
    want: Want,
    /// The serving tasks (one per address), or why the host port could not be had.
    listening: Result<Vec<Serving>, String>,
}

/// A task accepting TCP connections or relaying UDP clients; dropping it closes its
/// socket.
#[derive(Debug)]
struct Serving(JoinHandle<()>);

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Table {
    fn new(id: &str, address: IpAddr) -> Self {
        Self {
            id: id.to_string(),
            address,
            socket: None,
            entries: BTreeMap::new(),
        }
    }

    /// Makes the listeners match `wanted`: drops the ports no longer wanted, listens on the
    /// new ones and tries again the refused ones.
    fn reconcile(&mut self, wanted: &BTreeMap<HostPort, Want>) {
        let Some(socket) = self.socket.clone() else {
            return;
        };
        self.entries
            .retain(|port, e| wanted.get(port) == Some(&e.want));
        for (&(host, protocol), &want) in wanted {
            let entry = self.entries.get(&(host, protocol));
            if entry.is_some_and(|e| e.listening.is_ok()) {
                continue;
            }
            let listening = listen(self.address, (host, protocol), want.guest, &socket);
            match (&listening, entry) {
                (Ok(_), _) => {
                    tracing::info!(machine = %self.id, host_port = host, guest_port = want.guest, %protocol, "forwarding a port")
                }
                (Err(reason), None) => {
                    tracing::info!(machine = %self.id, host_port = host, guest_port = want.guest, %protocol, %reason, "cannot forward a port")
                }
                (Err(_), Some(_)) => {}
            }
            self.entries
                .insert((host, protocol), Entry { want, listening });
        }
    }

    fn list(&self) -> Vec<PortForward> {
        self.entries
            .iter()
            .map(|(&(host, protocol), e)| PortForward {
                guest_port: e.want.guest,
                protocol,
                host_address: self.address.to_string(),
                host_port: host,
                state: match e.listening {
                    Ok(_) => PortState::Forwarded,
                    Err(_) => PortState::Refused,
                },
                reason: e.listening.as_ref().err().cloned(),
                published: e.want.published,
            })
            .collect()
    }
}

/// Listens on `address:host` (and `[::1]:host` with 127.0.0.1, when it can) and forwards
/// each connection (each UDP client) to `guest`. A host port in use is refused, never
/// shared.
fn listen(
    address: IpAddr,
    (host, protocol): HostPort,
    guest: u16,
    socket: &std::path::Path,
) -> Result<Vec<Serving>, String> {
    let bind = |ip: IpAddr| -> std::io::Result<Serving> {
        let at = SocketAddr::new(ip, host);
        let agent = socket.to_path_buf();
        let task = match protocol {
            Protocol::Tcp => {
                let std = std::net::TcpListener::bind(at)?;
                std.set_nonblocking(true)?;
                let listener = tokio::net::TcpListener::from_std(std)?;
                tokio::spawn(accept(listener, agent, guest))
            }
            Protocol::Udp => {
                let std = std::net::UdpSocket::bind(at)?;
                std.set_nonblocking(true)?;
                let socket = tokio::net::UdpSocket::from_std(std)?;
                tokio::spawn(udp::relay(socket, agent, guest, udp::Limits::default()))
            }
        };
        Ok(Serving(task))
    };
    let shown = match protocol {
        Protocol::Tcp => format!("{address}:{host}"),
        Protocol::Udp => format!("{address}:{host} (udp)"),
    };
    let first = bind(address).map_err(|e| match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            format!("host port {shown} is in use by another program or machine")
        }
        _ => format!("cannot listen on {shown}: {e}"),
    })?;
    let mut serving = vec![first];
    if address == IpAddr::V4(Ipv4Addr::LOCALHOST)
        && let Ok(v6) = bind(IpAddr::V6(Ipv6Addr::LOCALHOST))
    {
        serving.push(v6);
    }
    Ok(serving)
}

/// Accepts connections for ever, each relayed to the guest port on a task of its own.
async fn accept(listener: tokio::net::TcpListener, socket: PathBuf, guest: u16) {
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => {
                tokio::spawn(relay(tcp, socket.clone(), guest));
            }
            Err(e) => {
                // Out of descriptors, most likely: a moment later may do.
                tracing::debug!(error = %e, "accepting a forwarded connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Joins one host connection to `guest` in the machine; a guest port nobody listens on
/// closes the host connection.
async fn relay(tcp: tokio::net::TcpStream, socket: PathBuf, guest: u16) {
    let _ = tcp.set_nodelay(true);
    let connected = tokio::time::timeout(CONNECT_TIMEOUT, async {
        proto::client::AgentClient::connect(&socket, proto::PORT)
            .await?
            .forward(guest)
            .await
    })
    .await;
    let forwarded = match connected {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(guest_port = guest, error = %e, "a forwarded connection did not reach the guest");
            return;
        }
        Err(_) => {
            tracing::debug!(
                guest_port = guest,
                "a forwarded connection timed out reaching the guest"
            );
            return;
        }
    };
    // Each side's end is passed on: the client's, as the end of its input only (a client
    // that half-closes after its request still gets the reply; with an agent from before
    // that, it shuts the guest connection down both ways), and the guest server's, as the
    // agent ends the session once that server has finished sending.
    let _ = forwarded.relay(tcp, COPY_BUFFER).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want(guest: u16, published: bool) -> Want {
        Want { guest, published }
    }

    fn tcp(ports: &[u16]) -> GuestPorts {
        GuestPorts {
            tcp: ports.to_vec(),
            udp: Vec::new(),
        }
    }

    const T: Protocol = Protocol::Tcp;
    const U: Protocol = Protocol::Udp;

    #[test]
    fn reported_ports_keep_their_number_and_privileged_ones_move_above_10000() {
        let wanted = desired(&[], &tcp(&[22, 80, 3000, 8080]));
        let got: Vec<_> = wanted.into_iter().collect();
        assert_eq!(
            got,
            [
                ((3000, T), want(3000, false)),
                ((8080, T), want(8080, false)),
                ((10022, T), want(22, false)),
                ((10080, T), want(80, false)),
            ]
        );
    }

    #[test]
    fn published_ports_stay_and_win_over_reported_ones() {
        let publish = [
            Publish {
                host_port: 9000,
                guest_port: 80,
                protocol: T,
            },
            Publish {
                host_port: 8080,
                guest_port: 5000,
                protocol: T,
            },
        ];
        // Guest 80 is published (not also at 10080); guest 8080 would take the host port
        // that 5000 is published on.
        let wanted = desired(&publish, &tcp(&[80, 8080, 3000]));
        let got: Vec<_> = wanted.into_iter().collect();
        assert_eq!(
            got,
            [
                ((3000, T), want(3000, false)),
                ((8080, T), want(5000, true)),
                ((9000, T), want(80, true)),
            ]
        );
        // Nothing reported: the published ports stay.
        assert_eq!(desired(&publish, &tcp(&[])).len(), 2);
    }

    #[test]
    fn udp_ports_are_forwarded_beside_tcp_ones_of_the_same_number() {
        let publish = [Publish {
            host_port: 5300,
            guest_port: 53,
            protocol: U,
        }];
        let reported = GuestPorts {
            tcp: vec![53, 8080],
            udp: vec![53, 5353, 8080],
        };
        let got: Vec<_> = desired(&publish, &reported).into_iter().collect();
        assert_eq!(
            got,
            [
                // UDP 53 is published at 5300; TCP 53 is not, so it gets its default.
                ((5300, U), want(53, true)),
                ((5353, U), want(5353, false)),
                ((8080, T), want(8080, false)),
                ((8080, U), want(8080, false)),
                ((10053, T), want(53, false)),
            ]
        );
    }

    #[tokio::test]
    async fn a_host_port_in_use_is_refused_and_left_to_its_owner_then_taken_once_free() {
        let dir = tempfile::tempdir().unwrap();
        let mut table = Table::new("dev", Ipv4Addr::LOCALHOST.into());
        table.socket = Some(dir.path().join("agent.sock"));
        // Another program holds a port; a free one is found the same way.
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = held.local_addr().unwrap().port();
        let free = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let wanted = desired(&[], &tcp(&[taken, free]));
        table.reconcile(&wanted);
        let list = table.list();
        let of = |port: u16| list.iter().find(|p| p.host_port == port).unwrap().clone();
        assert_eq!(of(free).state, PortState::Forwarded);
        assert_eq!(of(taken).state, PortState::Refused);
        assert!(of(taken).reason.unwrap().contains("in use"), "{list:?}");
        // The owner still has it: its listener accepts.
        let _client = std::net::TcpStream::connect(("127.0.0.1", taken)).unwrap();
        held.set_nonblocking(false).unwrap();
        held.accept().unwrap();
        // Freed, it is forwarded at the next try.
        drop(held);
        table.reconcile(&wanted);
        assert!(table.list().iter().all(|p| p.state == PortState::Forwarded));
        // No longer reported: no longer listened on.
        table.reconcile(&desired(&[], &tcp(&[])));
        assert!(table.list().is_empty());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(std::net::TcpListener::bind(("127.0.0.1", free)).is_ok());
    }

    #[tokio::test]
    async fn a_udp_host_port_in_use_is_refused_and_the_tcp_one_of_that_number_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let mut table = Table::new("dev", Ipv4Addr::LOCALHOST.into());
        table.socket = Some(dir.path().join("agent.sock"));
        let held = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let reported = GuestPorts {
            tcp: vec![port],
            udp: vec![port],
        };
        table.reconcile(&desired(&[], &reported));
        let list = table.list();
        let of = |protocol| list.iter().find(|p| p.protocol == protocol).unwrap();
        assert_eq!(of(U).state, PortState::Refused, "{list:?}");
        let reason = of(U).reason.clone().unwrap();
        assert!(
            reason.contains("in use") && reason.contains("udp"),
            "{reason}"
        );
        assert_eq!(of(T).state, PortState::Forwarded, "{list:?}");
        // Freed, it is taken at the next try; no longer reported, let go.
        drop(held);
        table.reconcile(&desired(&[], &reported));
        assert!(table.list().iter().all(|p| p.state == PortState::Forwarded));
        table.reconcile(&desired(&[], &GuestPorts::default()));
        assert!(table.list().is_empty());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok());
    }
}
