//! The UDP side of port forwarding: a host UDP socket relayed to a guest port.
//!
//! UDP has no connections, so the relay makes them up, as Docker's userland proxy does:
//! the datagrams of one client (its source address and port) travel on one `ForwardUdp`
//! session with the agent, whose socket in the guest stands in for that client, so the
//! guest's server sees one peer per host client and its replies go back to the client that
//! asked. A session ends after [`IDLE`] with no datagram either way, and at most
//! [`MAX_SESSIONS`] are open per host socket: beyond that a new client's datagrams are
//! dropped (the clients already relayed keep working) until one ends.
//!
//! Invariant: every session is a task owned by its socket's relay, so dropping the relay
//! (the port is no longer forwarded, the VM stopped) ends them all and frees the host port
//! at once, whatever the clients do.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use container_agent_proto as proto;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

/// How long a client's session lives without a datagram either way. UDP gives no end of a
/// conversation, so a relay can only guess: Linux's conntrack forgets an unanswered UDP
/// flow after 30 s and an answered one after 120 s, Docker's userland proxy
/// (`docker-proxy`'s `UDPConnTrackTimeout`) after 90 s. A minute keeps the request and
/// reply protocols a developer serves (DNS, statsd, syslog, game and media servers with
/// keep-alives every few seconds) on one session, so the guest's server sees the client as
/// one peer throughout, and returns the session's guest socket, agent threads and vsock
/// connection soon after the client is gone.
pub(super) const IDLE: Duration = Duration::from_secs(60);
/// The most client sessions one host socket keeps at once. Each costs a vsock connection,
/// a socket and two threads in the guest's agent; a developer's clients open a handful in
/// a minute, a client that sends from a new port per query (a resolver) a few a second, so
/// this bounds what a flood of source addresses can cost the machine, and no more.
pub(super) const MAX_SESSIONS: usize = 128;
/// Datagrams a session holds while its vsock connection is set up or busy; more are lost,
/// as on a congested link.
const QUEUE: usize = 64;
/// The largest UDP payload.
const MAX_DATAGRAM: usize = 65_535;
/// How long a session may take to reach the agent.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a client's session may idle, and how many a socket keeps at once.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    pub idle: Duration,
    pub max_sessions: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            idle: IDLE,
            max_sessions: MAX_SESSIONS,
        }
    }
}

/// Relays every client of `socket` to UDP `guest` in the machine whose agent is at `agent`,
/// for as long as the returned future runs.
pub(super) async fn relay(socket: UdpSocket, agent: PathBuf, guest: u16, limits: Limits) {
    let socket = Arc::new(socket);
    let mut sessions: HashMap<SocketAddr, mpsc::Sender<Vec<u8>>> = HashMap::new();
    // Each yields its client when it ends; dropped with the relay, they are aborted.
    let mut tasks: JoinSet<SocketAddr> = JoinSet::new();
    let mut at_cap = false;
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        tokio::select! {
            received = socket.recv_from(&mut buf) => {
                let (n, client) = match received {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::debug!(error = %e, "receiving a forwarded datagram failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let mut datagram = buf[..n].to_vec();
                if let Some(queue) = sessions.get(&client) {
                    match queue.try_send(datagram) {
                        Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => continue,
                        // Its session ended a moment ago: this datagram opens another.
                        Err(mpsc::error::TrySendError::Closed(d)) => {
                            datagram = d;
                            sessions.remove(&client);
                        }
                    }
                }
                if sessions.len() >= limits.max_sessions {
                    if !at_cap {
                        tracing::warn!(guest_port = guest, limit = limits.max_sessions, "too many UDP clients at once: new clients' datagrams are dropped until one has been idle for a minute");
                        at_cap = true;
                    }
                    continue;
                }
                at_cap = false;
                let (queue, queued) = mpsc::channel(QUEUE);
                let _ = queue.try_send(datagram);
                sessions.insert(client, queue);
                let session = session(socket.clone(), client, queued, agent.clone(), guest, limits.idle);
                tasks.spawn(session);
            }
            Some(ended) = tasks.join_next(), if !tasks.is_empty() => {
                // Forgotten unless a newer session took its place already.
                if let Ok(client) = ended
                    && sessions.get(&client).is_some_and(|q| q.is_closed())
                {
                    sessions.remove(&client);
                }
            }
        }
    }
}

/// One client's session: opens it with the agent, then relays until either side ends it or
/// it has been `idle` for that long; returns the client.
async fn session(
    socket: Arc<UdpSocket>,
    client: SocketAddr,
    mut queued: mpsc::Receiver<Vec<u8>>,
    agent: PathBuf,
    guest: u16,
    idle_limit: Duration,
) -> SocketAddr {
    let (mut to_guest, mut from_guest) = match open(&agent, guest).await {
        Ok(halves) => halves,
        Err(e) => {
            // Nothing bound there (yet): this client's datagrams so far are lost.
            tracing::debug!(guest_port = guest, %client, error = %e, "a forwarded datagram did not reach the guest");
            return client;
        }
    };
    let idle = tokio::time::sleep(idle_limit);
    tokio::pin!(idle);
    loop {
        tokio::select! {
            datagram = queued.recv() => {
                let Some(datagram) = datagram else { break };
                if to_guest.send(&datagram).await.is_err() {
                    break;
                }
            }
            reply = from_guest.recv() => {
                let Some(Ok(reply)) = reply else { break };
                // A client that went away is no reason to end: UDP does not know.
                let _ = socket.send_to(&reply, client).await;
            }
            _ = &mut idle => break,
        }
        idle.as_mut()
            .reset(tokio::time::Instant::now() + idle_limit);
    }
    client
}

async fn open(
    agent: &Path,
    guest: u16,
) -> Result<
    (
        proto::client::DatagramSender,
        proto::client::DatagramReceiver,
    ),
    proto::ProtoError,
> {
    tokio::time::timeout(CONNECT_TIMEOUT, async {
        proto::client::AgentClient::connect(agent, proto::PORT)
            .await?
            .forward_udp(guest)
            .await
    })
    .await
    .map_err(|_| proto::ProtoError::Timeout)?
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use proto::host::{read, send, write};
    use proto::{Frame, Kind, Message};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

    /// A fake machine whose agent answers each `ForwardUdp` session by echoing every
    /// datagram after the session's number; counts the sessions opened.
    fn fake_agent(dir: &Path) -> (PathBuf, Arc<AtomicUsize>) {
        let path = dir.join("vsock.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let opened = Arc::new(AtomicUsize::new(0));
        let count = opened.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::spawn(async move {
                    let mut reader = tokio::io::BufReader::new(stream);
                    let mut line = String::new();
                    reader.read_line(&mut line).await.unwrap();
                    let mut s = reader.into_inner();
                    s.write_all(b"OK 1\n").await.unwrap();
                    let Some(Frame::Message(Message::Hello { version })) =
                        read(&mut s).await.unwrap()
                    else {
                        panic!("no hello")
                    };
                    let hello = Message::HelloOk {
                        version,
                        agent: "test".into(),
                        half_close: true,
                    };
                    send(&mut s, hello).await.unwrap();
                    let Some(Frame::Message(Message::ForwardUdp { port: 7070 })) =
                        read(&mut s).await.unwrap()
                    else {
                        panic!("not a UDP forward to 7070")
                    };
                    send(&mut s, Message::Done).await.unwrap();
                    while let Ok(Some(Frame::Data(Kind::Data, d))) = read(&mut s).await {
                        let reply = [format!("{n} ").as_bytes(), &d].concat();
                        if write(&mut s, &Frame::Data(Kind::Data, reply))
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                });
            }
        });
        (path, opened)
    }

    /// A client socket connected to `server`; what it gets back for `datagram`.
    async fn ask(client: &UdpSocket, datagram: &str) -> String {
        client.send(datagram.as_bytes()).await.unwrap();
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    async fn client_of(server: SocketAddr) -> UdpSocket {
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(server).await.unwrap();
        client
    }

    #[tokio::test]
    async fn each_client_has_a_session_of_its_own_and_the_port_is_freed_with_the_relay() {
        let dir = tempfile::tempdir().unwrap();
        let (agent, opened) = fake_agent(dir.path());
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let server = socket.local_addr().unwrap();
        let relay = tokio::spawn(relay(socket, agent, 7070, Limits::default()));
        let (a, b) = (client_of(server).await, client_of(server).await);
        assert_eq!(ask(&a, "one").await, "1 one");
        assert_eq!(ask(&b, "two").await, "2 two");
        // The same client stays on its session, an empty datagram included.
        assert_eq!(ask(&a, "three").await, "1 three");
        assert_eq!(ask(&a, "").await, "1 ");
        assert_eq!(opened.load(Ordering::SeqCst), 2);
        // The relay gone, the host port is free at once, whatever the clients' sessions.
        relay.abort();
        let _ = relay.await;
        std::net::UdpSocket::bind(server).expect("the host port let go");
    }

    #[tokio::test]
    async fn an_idle_client_gets_a_new_session_and_clients_beyond_the_cap_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (agent, opened) = fake_agent(dir.path());
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let server = socket.local_addr().unwrap();
        let limits = Limits {
            idle: Duration::from_millis(500),
            max_sessions: 1,
        };
        let _relay = tokio::spawn(relay(socket, agent, 7070, limits));
        let (a, b) = (client_of(server).await, client_of(server).await);
        assert_eq!(ask(&a, "one").await, "1 one");
        // Traffic keeps the session: never idle for 500 ms in a row.
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert_eq!(ask(&a, "still").await, "1 still");
        }
        // A second client while the first holds the only session: dropped, unanswered.
        b.send(b"me too").await.unwrap();
        let mut buf = [0u8; 64];
        let waited = tokio::time::timeout(Duration::from_millis(300), b.recv(&mut buf)).await;
        assert!(waited.is_err(), "a client beyond the cap was answered");
        // Once the first has been idle that long, its session ends and the second gets one.
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(ask(&b, "now").await, "2 now");
        assert_eq!(opened.load(Ordering::SeqCst), 2);
    }
}
