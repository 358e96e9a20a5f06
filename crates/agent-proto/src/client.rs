//! The typed host-side client of the agent: one [`AgentClient`] per session, opened through
//! the machine's hybrid-vsock socket, consumed by the one request it makes. It is the one
//! place the host speaks the session protocol (the service's runtime uses nothing else), so
//! what each answer means, a failure part-way through a stream included, is decided here.
//!
//! ```no_run
//! # async fn demo(uds: &std::path::Path) -> Result<(), container_agent_proto::ProtoError> {
//! use container_agent_proto::{ExecRequest, PORT, READY_PORT, client::*};
//! // Bound before the VM starts; the agent reports to it once it listens.
//! let ready = ReadyListener::bind(uds, READY_PORT)?;
//! let readiness = wait_ready(&ready, uds, PORT, std::time::Instant::now() + std::time::Duration::from_secs(30)).await?;
//! let session = AgentClient::connect(uds, PORT).await?
//!     .exec(ExecRequest { argv: vec!["echo".into(), "hi".into()], cwd: "/".into(), ..Default::default() })
//!     .await?;
//! let out = session.output(b"").await?;
//! assert_eq!(out.stdout, b"hi\n");
//! # Ok(()) }
//! ```

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use crate::host::{open, read, send, write};
use crate::{ExecRequest, Frame, Kind, Message, ProtoError};

/// Largest data frame the client sends.
const CHUNK: usize = 256 * 1024;

/// What a ping learns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Readiness {
    /// Time since the agent's daemon started.
    pub uptime: Duration,
    /// PID 1 is the image's init (the agent has handed over).
    pub init_running: bool,
    /// The image's init has finished booting.
    pub booted: bool,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

impl ExitStatus {
    /// The shell's view: the code, or 128 + the signal.
    pub fn code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => 128 + s,
        }
    }
}

/// Something a running process produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// The last event of a session.
    Exit(ExitStatus),
}

/// Everything a finished process produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub status: ExitStatus,
}

/// A session with the agent, before its request.
#[derive(Debug)]
pub struct AgentClient {
    stream: UnixStream,
    hello: crate::host::Hello,
}

impl AgentClient {
    /// Connects through the hybrid-vsock socket `uds` to the agent on `port` and says hello.
    pub async fn connect(uds: &Path, port: u32) -> Result<AgentClient, ProtoError> {
        let (stream, hello) = open(uds, port).await?;
        Ok(AgentClient { stream, hello })
    }

    /// The agent's version string (its crate version).
    pub fn agent_version(&self) -> &str {
        &self.hello.agent
    }

    async fn request(mut self, m: Message) -> Result<Message, ProtoError> {
        send(&mut self.stream, m).await?;
        match read(&mut self.stream).await? {
            Some(Frame::Message(Message::Error { message, code })) => {
                Err(ProtoError::Agent { message, code })
            }
            Some(Frame::Message(m)) => Ok(m),
            other => Err(ProtoError::unexpected(other.as_ref())),
        }
    }

    /// Asks whether the agent is up and the image's init runs.
    pub async fn ping(self) -> Result<Readiness, ProtoError> {
        match self.request(Message::Ping).await? {
            Message::Pong {
                uptime_ms,
                init_running,
                booted,
                ..
            } => Ok(Readiness {
                uptime: Duration::from_millis(uptime_ms),
                init_running,
                booted,
            }),
            other => Err(ProtoError::Unexpected(format!("{other:?}"))),
        }
    }

    /// What the guest's memory holds now.
    pub async fn stats(self) -> Result<crate::GuestMemory, ProtoError> {
        match self.request(Message::Stats).await? {
            Message::StatsReport(memory) => Ok(memory),
            other => Err(ProtoError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Has the guest drop its clean page cache and compact its free memory.
    pub async fn reclaim(self) -> Result<(), ProtoError> {
        self.expect_done(Message::Reclaim).await
    }

    /// Sets the guest's clock.
    pub async fn set_time(self, unix_ns: u64) -> Result<(), ProtoError> {
        self.expect_done(Message::SetTime { unix_ns }).await
    }

    /// Sends the stop signal to the image's init (`None`: the init's own power-off signal);
    /// the agent forces the power off after `timeout`. Returns once the signal is sent: the
    /// machine is down when the VMM exits.
    ///
    /// Once the request is sent, the session closing without an answer counts as accepted:
    /// the init it signalled may kill every process, the agent too, before the answer leaves
    /// (busybox init does).
    pub async fn shutdown(
        mut self,
        signal: Option<i32>,
        timeout: Duration,
    ) -> Result<(), ProtoError> {
        let request = Message::Shutdown {
            signal,
            timeout_ms: timeout.as_millis().try_into().unwrap_or(u64::MAX),
        };
        send(&mut self.stream, request).await?;
        match read(&mut self.stream).await {
            Ok(Some(Frame::Message(Message::Done)) | None) => Ok(()),
            Ok(Some(Frame::Message(Message::Error { message, code }))) => {
                Err(ProtoError::Agent { message, code })
            }
            Ok(other) => Err(ProtoError::unexpected(other.as_ref())),
            Err(ProtoError::Io(e)) if e.kind() != std::io::ErrorKind::TimedOut => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Freezes the guest's root filesystem; it stays frozen until [`FrozenGuest::thaw`], the
    /// drop of the returned guard, or `timeout`, whichever comes first.
    pub async fn freeze(mut self, timeout: Duration) -> Result<FrozenGuest, ProtoError> {
        let request = Message::Freeze {
            timeout_ms: timeout.as_millis().try_into().unwrap_or(u64::MAX),
        };
        send(&mut self.stream, request).await?;
        match read(&mut self.stream).await? {
            Some(Frame::Message(Message::Done)) => Ok(FrozenGuest {
                stream: self.stream,
            }),
            Some(Frame::Message(Message::Error { message, code })) => {
                Err(ProtoError::Agent { message, code })
            }
            other => Err(ProtoError::unexpected(other.as_ref())),
        }
    }

    /// Follows the guest's listening TCP ports and served UDP ports: the first
    /// [`PortWatch::next`] is the whole set now, each later one the set after a change.
    pub async fn watch_ports(mut self) -> Result<PortWatch, ProtoError> {
        send(&mut self.stream, Message::WatchPorts).await?;
        Ok(PortWatch {
            stream: self.stream,
        })
    }

    /// Connects to TCP `port` on the guest's loopback; [`Forwarded::relay`] then carries a
    /// host connection's bytes to it and back. Nothing listening there is
    /// [`ProtoError::Agent`].
    pub async fn forward(self, port: u16) -> Result<Forwarded, ProtoError> {
        let framed = self.hello.half_close;
        let request = match framed {
            true => Message::ForwardStream { port },
            false => Message::Forward { port },
        };
        Ok(Forwarded {
            stream: self.open_forward(request).await?,
            framed,
        })
    }

    /// As [`forward`](Self::forward), but the stream returned carries the connection's raw
    /// bytes, for a peer that never half-closes (an SSH tunnel: the end of its input ends
    /// the connection both ways).
    pub async fn forward_raw(self, port: u16) -> Result<UnixStream, ProtoError> {
        self.open_forward(Message::Forward { port }).await
    }

    async fn open_forward(mut self, request: Message) -> Result<UnixStream, ProtoError> {
        send(&mut self.stream, request).await?;
        match read(&mut self.stream).await? {
            Some(Frame::Message(Message::Done)) => Ok(self.stream),
            Some(Frame::Message(Message::Error { message, code })) => {
                Err(ProtoError::Agent { message, code })
            }
            other => Err(ProtoError::unexpected(other.as_ref())),
        }
    }

    /// Relays datagrams to UDP `port` on the guest's loopback from a socket of the
    /// session's own: what is sent on the first half reaches the guest's server, its replies
    /// come out of the second. A port nobody serves is [`ProtoError::Agent`].
    pub async fn forward_udp(
        mut self,
        port: u16,
    ) -> Result<(DatagramSender, DatagramReceiver), ProtoError> {
        send(&mut self.stream, Message::ForwardUdp { port }).await?;
        match read(&mut self.stream).await? {
            Some(Frame::Message(Message::Done)) => {}
            Some(Frame::Message(Message::Error { message, code })) => {
                return Err(ProtoError::Agent { message, code });
            }
            other => return Err(ProtoError::unexpected(other.as_ref())),
        }
        let (r, w) = self.stream.into_split();
        let datagrams = futures_util::stream::unfold(Some(r), |r| async move {
            let mut r = r?;
            match read(&mut r).await {
                Ok(Some(Frame::Data(Kind::Data, d))) => Some((Ok(d), Some(r))),
                Ok(None) => None,
                Ok(other) => Some((Err(ProtoError::unexpected(other.as_ref())), None)),
                Err(e) => Some((Err(e), None)),
            }
        });
        Ok((
            DatagramSender { w },
            DatagramReceiver {
                datagrams: Box::pin(datagrams),
            },
        ))
    }

    async fn expect_done(self, m: Message) -> Result<(), ProtoError> {
        match self.request(m).await? {
            Message::Done => Ok(()),
            other => Err(ProtoError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Starts a process. A process that cannot start (not found, not executable, no such
    /// directory or user) is `ProtoError::Agent` with code 127 or 126.
    pub async fn exec(mut self, req: ExecRequest) -> Result<ExecSession, ProtoError> {
        send(&mut self.stream, Message::Exec(req)).await?;
        let (mut r, w) = self.stream.into_split();
        match read(&mut r).await? {
            Some(Frame::Message(Message::Started { pid })) => Ok(ExecSession {
                pid,
                input: ExecInput { w },
                output: ExecEvents { r, done: false },
            }),
            Some(Frame::Message(Message::Error { message, code })) => {
                Err(ProtoError::Agent { message, code })
            }
            other => Err(ProtoError::unexpected(other.as_ref())),
        }
    }

    /// Unpacks a tar stream at `dest` in the machine: into it when it is a directory, else
    /// as it (the archive's top entry renamed). Ownership and modes in the archive are kept.
    /// A failure to read `tar` is [`ProtoError::Input`]; the agent's refusal (a bad archive,
    /// a destination it cannot write) is [`ProtoError::Agent`].
    pub async fn copy_in<R: AsyncRead + Unpin>(
        mut self,
        dest: &str,
        mut tar: R,
    ) -> Result<(), ProtoError> {
        send(
            &mut self.stream,
            Message::CopyIn {
                path: dest.to_string(),
            },
        )
        .await?;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = tar.read(&mut buf).await.map_err(ProtoError::Input)?;
            if n == 0 {
                break;
            }
            write(
                &mut self.stream,
                &Frame::Data(Kind::Data, buf[..n].to_vec()),
            )
            .await?;
        }
        self.expect_done(Message::DataEof).await
    }

    /// A tar stream of `path` in the machine (its base name at the top). A missing path is
    /// an error here; a failure later is an I/O error of the reader.
    pub async fn copy_out(
        self,
        path: &str,
    ) -> Result<impl AsyncRead + Send + Unpin + 'static, ProtoError> {
        self.tar_stream(Message::CopyOut {
            path: path.to_string(),
        })
        .await
    }

    /// A tar stream of the machine's root filesystem alone, for a commit (see
    /// [`Message::CopyRoot`]); errors as [`AgentClient::copy_out`]'s.
    pub async fn copy_root(self) -> Result<impl AsyncRead + Send + Unpin + 'static, ProtoError> {
        self.tar_stream(Message::CopyRoot).await
    }

    /// Sends `request` and reads the tar stream that answers it.
    async fn tar_stream(
        mut self,
        request: Message,
    ) -> Result<impl AsyncRead + Send + Unpin + 'static, ProtoError> {
        send(&mut self.stream, request).await?;
        let first = match read(&mut self.stream).await? {
            Some(Frame::Data(Kind::Data, b)) => Some(b),
            Some(Frame::Message(Message::DataEof)) => None,
            Some(Frame::Message(Message::Error { message, code })) => {
                return Err(ProtoError::Agent { message, code });
            }
            other => return Err(ProtoError::unexpected(other.as_ref())),
        };
        let state = (first, Some(self.stream));
        let chunks = futures_util::stream::unfold(state, |(first, stream)| async move {
            if let Some(b) = first {
                return Some((Ok(Bytes::from(b)), (None, stream)));
            }
            let mut s = stream?;
            match read(&mut s).await {
                Ok(Some(Frame::Data(Kind::Data, b))) => Some((Ok(Bytes::from(b)), (None, Some(s)))),
                Ok(Some(Frame::Message(Message::DataEof))) => None,
                Ok(Some(Frame::Message(Message::Error { message, code }))) => Some((
                    Err(std::io::Error::other(ProtoError::Agent { message, code })),
                    (None, None),
                )),
                Ok(other) => Some((
                    Err(std::io::Error::other(ProtoError::unexpected(
                        other.as_ref(),
                    ))),
                    (None, None),
                )),
                Err(e) => Some((Err(std::io::Error::other(e)), (None, None))),
            }
        });
        Ok(tokio_util::io::StreamReader::new(Box::pin(chunks)))
    }
}

/// A TCP connection in the guest, opened by [`AgentClient::forward`].
#[derive(Debug)]
pub struct Forwarded {
    stream: UnixStream,
    /// The host's bytes go in `Data` frames, their end as `DataEof` (`ForwardStream`).
    framed: bool,
}

impl Forwarded {
    /// Copies `peer`'s bytes to the guest connection and the guest's back until both ends
    /// are done. With an agent that takes half-closes, the end of `peer`'s input shuts down
    /// only the guest connection's sending side, so a reply still comes back; with an older
    /// one it ends the connection both ways. `buffer`: bytes read at a time.
    pub async fn relay<P>(self, mut peer: P, buffer: usize) -> std::io::Result<()>
    where
        P: AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        use tokio::io::AsyncWriteExt;
        let mut stream = self.stream;
        if !self.framed {
            tokio::io::copy_bidirectional_with_sizes(&mut peer, &mut stream, buffer, buffer)
                .await?;
            return Ok(());
        }
        let (mut from_guest, mut to_guest) = stream.into_split();
        let (mut from_peer, mut to_peer) = tokio::io::split(peer);
        let up = async {
            let mut buf = vec![0u8; buffer.min(crate::MAX_FRAME)];
            loop {
                let n = from_peer.read(&mut buf).await?;
                if n == 0 {
                    return send(&mut to_guest, Message::DataEof).await;
                }
                write(&mut to_guest, &Frame::Data(Kind::Data, buf[..n].to_vec())).await?;
            }
        };
        let down = async {
            tokio::io::copy_buf(
                &mut tokio::io::BufReader::with_capacity(buffer, &mut from_guest),
                &mut to_peer,
            )
            .await?;
            to_peer.shutdown().await
        };
        tokio::try_join!(up, down).map(|_| ())
    }
}

/// The sending half of a [`AgentClient::forward_udp`] session.
#[derive(Debug)]
pub struct DatagramSender {
    w: OwnedWriteHalf,
}

impl DatagramSender {
    /// Sends one datagram to the guest's server.
    pub async fn send(&mut self, datagram: &[u8]) -> Result<(), ProtoError> {
        write(&mut self.w, &Frame::Data(Kind::Data, datagram.to_vec())).await?;
        Ok(())
    }
}

/// The receiving half of a [`AgentClient::forward_udp`] session.
pub struct DatagramReceiver {
    datagrams:
        std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<Vec<u8>, ProtoError>> + Send>>,
}

impl std::fmt::Debug for DatagramReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatagramReceiver").finish_non_exhaustive()
    }
}

impl DatagramReceiver {
    /// The next datagram the guest's server sent back; `None` once the session ended.
    /// Cancel-safe: a frame part-read when the future is dropped is finished by the next
    /// call, so this can wait in a `select!` beside other work.
    pub async fn recv(&mut self) -> Option<Result<Vec<u8>, ProtoError>> {
        use futures_util::StreamExt;
        self.datagrams.next().await
    }
}

/// The guest's ports a [`PortWatch`] reports: listening TCP ports and served UDP ports, each
/// sorted, each port once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestPorts {
    pub tcp: Vec<u16>,
    pub udp: Vec<u16>,
}

/// A session following the guest's listening ports; dropping it ends the session.
#[derive(Debug)]
pub struct PortWatch {
    stream: UnixStream,
}

impl PortWatch {
    /// The next set of ports; waits for a change after the first. The session's end (the
    /// VM stopped, the agent died) is [`ProtoError::Closed`]; an agent that predates port
    /// reports answers with [`ProtoError::Agent`]; one that predates UDP reports none.
    pub async fn next(&mut self) -> Result<GuestPorts, ProtoError> {
        match read(&mut self.stream).await? {
            Some(Frame::Message(Message::Ports { ports, udp })) => {
                Ok(GuestPorts { tcp: ports, udp })
            }
            Some(Frame::Message(Message::Error { message, code })) => {
                Err(ProtoError::Agent { message, code })
            }
            None => Err(ProtoError::Closed),
            other => Err(ProtoError::unexpected(other.as_ref())),
        }
    }
}

/// A guest whose root filesystem is frozen; dropping it ends the session, which thaws too.
#[derive(Debug)]
pub struct FrozenGuest {
    stream: UnixStream,
}

impl FrozenGuest {
    /// Thaws the guest's filesystem and waits for the agent to confirm.
    pub async fn thaw(mut self) -> Result<(), ProtoError> {
        send(&mut self.stream, Message::Thaw).await?;
        match read(&mut self.stream).await? {
            Some(Frame::Message(Message::Done)) => Ok(()),
            Some(Frame::Message(Message::Error { message, code })) => {
                Err(ProtoError::Agent { message, code })
            }
            other => Err(ProtoError::unexpected(other.as_ref())),
        }
    }
}

/// A running process: its pid, and the two halves of its session, usable from two tasks.
#[derive(Debug)]
pub struct ExecSession {
    pid: i32,
    input: ExecInput,
    output: ExecEvents,
}

impl ExecSession {
    /// The process's pid in the machine.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The input half (stdin, resize, signals) and the output half (output and exit).
    pub fn split(self) -> (ExecInput, ExecEvents) {
        (self.input, self.output)
    }

    /// Feeds `stdin` and closes it, collecting all output until the process ends.
    pub async fn output(self, stdin: &[u8]) -> Result<ExecOutput, ProtoError> {
        let (mut input, mut events) = self.split();
        let feed = async {
            if !stdin.is_empty() {
                input.write_stdin(stdin).await?;
            }
            input.close_stdin().await
        };
        let collect = async {
            let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
            loop {
                match events.next().await? {
                    ExecEvent::Stdout(b) => stdout.extend_from_slice(&b),
                    ExecEvent::Stderr(b) => stderr.extend_from_slice(&b),
                    ExecEvent::Exit(status) => {
                        return Ok(ExecOutput {
                            stdout,
                            stderr,
                            status,
                        });
                    }
                }
            }
        };
        let (fed, collected) = tokio::join!(feed, collect);
        // A process that exits without reading its input makes feeding fail; its output
        // still is the answer.
        match (fed, collected) {
            (_, Ok(out)) => Ok(out),
            (_, Err(e)) => Err(e),
        }
    }
}

/// The input half of an exec session.
#[derive(Debug)]
pub struct ExecInput {
    w: OwnedWriteHalf,
}

impl ExecInput {
    /// Sends input bytes.
    pub async fn write_stdin(&mut self, bytes: &[u8]) -> Result<(), ProtoError> {
        for chunk in bytes.chunks(CHUNK) {
            write(&mut self.w, &Frame::Data(Kind::Stdin, chunk.to_vec())).await?;
        }
        Ok(())
    }

    /// Ends the input (on a tty: types ^D).
    pub async fn close_stdin(&mut self) -> Result<(), ProtoError> {
        Ok(send(&mut self.w, Message::StdinEof).await?)
    }

    /// Resizes the terminal (tty sessions).
    pub async fn resize(&mut self, rows: u16, cols: u16) -> Result<(), ProtoError> {
        Ok(send(&mut self.w, Message::Resize { rows, cols }).await?)
    }

    /// Delivers `signal` to the process's session.
    pub async fn signal(&mut self, signal: i32) -> Result<(), ProtoError> {
        Ok(send(&mut self.w, Message::Signal { signal }).await?)
    }
}

/// The output half of an exec session.
#[derive(Debug)]
pub struct ExecEvents {
    r: OwnedReadHalf,
    done: bool,
}

impl ExecEvents {
    /// The next output or the exit; after the exit, `ProtoError::Closed`.
    pub async fn next(&mut self) -> Result<ExecEvent, ProtoError> {
        if self.done {
            return Err(ProtoError::Closed);
        }
        let frame = read(&mut self.r).await?;
        match frame {
            Some(Frame::Data(Kind::Stdout, b)) => Ok(ExecEvent::Stdout(b)),
            Some(Frame::Data(Kind::Stderr, b)) => Ok(ExecEvent::Stderr(b)),
            Some(Frame::Message(Message::Exit { code, signal })) => {
                self.done = true;
                let status = match (code, signal) {
                    (_, Some(s)) => ExitStatus::Signal(s),
                    (Some(c), None) => ExitStatus::Code(c),
                    (None, None) => {
                        return Err(ProtoError::Unexpected("an exit without status".into()));
                    }
                };
                Ok(ExecEvent::Exit(status))
            }
            Some(Frame::Message(Message::Error { message, code })) => {
                self.done = true;
                Err(ProtoError::Agent { message, code })
            }
            None => {
                self.done = true;
                Err(ProtoError::Closed)
            }
            other => Err(ProtoError::unexpected(other.as_ref())),
        }
    }
}

/// The host's end of the agent's readiness report: a Unix socket at `<uds>_<port>`, where
/// vhost-device-vsock delivers the connections the guest opens to host port `port`. Bound
/// before the VM starts; removed when dropped.
///
/// The host waits here rather than polling the agent: a host connection that reaches
/// vhost-device-vsock (0.3) after the guest mapped its memory but before it set up the
/// device's queues ends the device's worker thread, and every later connection then hangs.
/// The agent's own connection proves the queues are up.
#[derive(Debug)]
pub struct ReadyListener {
    listener: std::os::unix::net::UnixListener,
    path: std::path::PathBuf,
}

impl ReadyListener {
    /// Where vhost-device-vsock, serving `uds`, delivers the guest's connections to `port`.
    pub fn path_for(uds: &Path, port: u32) -> std::path::PathBuf {
        let mut path = uds.as_os_str().to_owned();
        path.push(format!("_{port}"));
        path.into()
    }

    /// Binds the socket, replacing a stale one. Needs no async runtime.
    pub fn bind(uds: &Path, port: u32) -> std::io::Result<Self> {
        let path = Self::path_for(uds, port);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let listener = std::os::unix::net::UnixListener::bind(&path)?;
        // Only the host's root side (vhost-device-vsock) is to reach it, whatever the umask.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        Ok(Self { listener, path })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for the agent's [`Message::Ready`] until `deadline`. Connections that say
    /// anything else are dropped; an agent of another protocol version is an error. The
    /// report is not acknowledged yet: see [`ReadyReport`].
    pub async fn wait(&self, deadline: Instant) -> Result<ReadyReport, ProtoError> {
        let listener = tokio::net::UnixListener::from_std(self.listener.try_clone()?)?;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (mut stream, _) = tokio::time::timeout(left, listener.accept())
                .await
                .map_err(|_| ProtoError::Timeout)??;
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, read(&mut stream)).await {
                Err(_) => return Err(ProtoError::Timeout),
                Ok(Ok(Some(Frame::Message(Message::Ready { version, agent })))) => {
                    if version != crate::VERSION {
                        return Err(ProtoError::Refused(format!(
                            "the agent {agent} speaks protocol version {version}, the service {}: install matching versions",
                            crate::VERSION
                        )));
                    }
                    return Ok(ReadyReport { agent, stream });
                }
                Ok(_) => continue,
            }
        }
    }
}

/// An agent's readiness report, received and not yet acknowledged. The agent repeats its
/// report until one is acknowledged, so the host acknowledges only once it has recorded
/// the readiness where a restarted service finds it: a service killed in between leaves an
/// agent that reports again, to the next service.
#[derive(Debug)]
pub struct ReadyReport {
    /// The agent's version.
    pub agent: String,
    stream: UnixStream,
}

impl ReadyReport {
    /// Tells the agent its report arrived. An agent from before acknowledgements has closed
    /// the connection already: that is no failure.
    pub async fn acknowledge(mut self) {
        let _ = send(&mut self.stream, Message::Done).await;
    }
}

impl Drop for ReadyListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Waits until the agent has said it is ready (acknowledging its report at once) and
/// answers a ping, or `deadline`.
pub async fn wait_ready(
    ready: &ReadyListener,
    uds: &Path,
    port: u32,
    deadline: Instant,
) -> Result<Readiness, ProtoError> {
    ready.wait(deadline).await?.acknowledge().await;
    ping_until(uds, port, deadline).await
}

/// Pings the agent, which has reported ready, until `deadline` (at least 2 s).
pub async fn ping_until(uds: &Path, port: u32, deadline: Instant) -> Result<Readiness, ProtoError> {
    let left = deadline.saturating_duration_since(Instant::now());
    tokio::time::timeout(left.max(Duration::from_secs(2)), async {
        AgentClient::connect(uds, port).await?.ping().await
    })
    .await
    .map_err(|_| ProtoError::Timeout)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::{read, send, write};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    use tokio::net::UnixListener;

    /// A fake vhost-device-vsock with an agent behind it: answers the hybrid handshake with
    /// `answer`, then hands each session to `agent`.
    fn fake<F, Fut>(dir: &Path, answer: &'static str, agent: F) -> std::path::PathBuf
    where
        F: Fn(UnixStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let path = dir.join("vsock.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let mut reader = tokio::io::BufReader::new(stream);
                let mut line = String::new();
                reader.read_line(&mut line).await.unwrap();
                assert_eq!(line, "CONNECT 1024\n");
                let mut stream = reader.into_inner();
                stream.write_all(answer.as_bytes()).await.unwrap();
                if answer.starts_with("OK") {
                    agent(stream).await;
                }
            }
        });
        path
    }

    /// Takes the session as an agent from before half-closes.
    async fn hello(s: &mut UnixStream) {
        hello_with(s, false).await
    }

    async fn hello_with(s: &mut UnixStream, half_close: bool) {
        match read(s).await.unwrap() {
            Some(Frame::Message(Message::Hello { version })) => assert_eq!(version, crate::VERSION),
            other => panic!("{other:?}"),
        }
        send(
            s,
            Message::HelloOk {
                version: crate::VERSION,
                agent: "9.9".into(),
                half_close,
            },
        )
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn an_agent_not_listening_yet_is_reported_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let uds = fake(dir.path(), "", |_| async {});
        let err = AgentClient::connect(&uds, 1024).await.unwrap_err();
        assert!(matches!(err, ProtoError::NotListening { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn another_protocol_version_is_refused_with_the_agents_words() {
        let dir = tempfile::tempdir().unwrap();
        let uds = fake(dir.path(), "OK 1\n", |mut s| async move {
            let _ = read(&mut s).await;
            let _ = send(
                &mut s,
                Message::Error {
                    message: "restart the machine".into(),
                    code: None,
                },
            )
            .await;
        });
        let err = AgentClient::connect(&uds, 1024).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "the guest agent refused the session: restart the machine"
        );
    }

    #[tokio::test]
    async fn exec_collects_output_and_status_and_reports_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let uds = fake(dir.path(), "OK 7\n", |mut s| async move {
            hello(&mut s).await;
            let Some(Frame::Message(Message::Exec(req))) = read(&mut s).await.unwrap() else {
                panic!("no exec")
            };
            if req.argv[0] == "missing" {
                let _ = send(
                    &mut s,
                    Message::Error {
                        message: "exec: \"missing\": executable file not found in $PATH".into(),
                        code: Some(127),
                    },
                )
                .await;
                return;
            }
            send(&mut s, Message::Started { pid: 42 }).await.unwrap();
            // Echo stdin to stdout until EOF, then exit by signal.
            loop {
                match read(&mut s).await.unwrap() {
                    Some(Frame::Data(Kind::Stdin, b)) => {
                        write(&mut s, &Frame::Data(Kind::Stdout, b)).await.unwrap()
                    }
                    Some(Frame::Message(Message::StdinEof)) => break,
                    other => panic!("{other:?}"),
                }
            }
            write(&mut s, &Frame::Data(Kind::Stderr, b"bye".to_vec()))
                .await
                .unwrap();
            send(
                &mut s,
                Message::Exit {
                    code: None,
                    signal: Some(9),
                },
            )
            .await
            .unwrap();
        });
        let argv = |a: &str| ExecRequest {
            argv: vec![a.into()],
            ..Default::default()
        };
        let client = AgentClient::connect(&uds, 1024).await.unwrap();
        assert_eq!(client.agent_version(), "9.9");
        let session = client.exec(argv("cat")).await.unwrap();
        assert_eq!(session.pid(), 42);
        let out = session.output(b"hello").await.unwrap();
        assert_eq!(
            out,
            ExecOutput {
                stdout: b"hello".to_vec(),
                stderr: b"bye".to_vec(),
                status: ExitStatus::Signal(9),
            }
        );
        assert_eq!(out.status.code(), 137);
        let err = AgentClient::connect(&uds, 1024)
            .await
            .unwrap()
            .exec(argv("missing"))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                ProtoError::Agent {
                    code: Some(127),
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn a_shutdown_the_agent_dies_of_before_answering_counts_as_taken() {
        let dir = tempfile::tempdir().unwrap();
        let uds = fake(dir.path(), "OK 7\n", |mut s| async move {
            hello(&mut s).await;
            match read(&mut s).await.unwrap() {
                // The init that got the signal killed the agent: no answer.
                Some(Frame::Message(Message::Shutdown {
                    signal: Some(15), ..
                })) => {}
                Some(Frame::Message(Message::Shutdown { .. })) => {
                    let refused = Message::Error {
                        message: "no init to signal".into(),
                        code: None,
                    };
                    send(&mut s, refused).await.unwrap();
                }
                other => panic!("{other:?}"),
            }
        });
        let client = AgentClient::connect(&uds, 1024).await.unwrap();
        client
            .shutdown(Some(15), Duration::from_secs(1))
            .await
            .unwrap();
        let client = AgentClient::connect(&uds, 1024).await.unwrap();
        let err = client
            .shutdown(None, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("no init to signal"), "{err}");
    }

    #[tokio::test]
    async fn copy_in_tells_a_refusal_from_a_source_that_fails() {
        let dir = tempfile::tempdir().unwrap();
        let uds = fake(dir.path(), "OK 7\n", |mut s| async move {
            hello(&mut s).await;
            let Some(Frame::Message(Message::CopyIn { .. })) = read(&mut s).await.unwrap() else {
                panic!("no copy in")
            };
            let mut got = Vec::new();
            while let Some(Frame::Data(Kind::Data, b)) = read(&mut s).await.unwrap() {
                got.extend_from_slice(&b);
            }
            let answer = match got.as_slice() {
                b"good" => Message::Done,
                _ => Message::Error {
                    message: "reading the archive: not a tar".into(),
                    code: None,
                },
            };
            let _ = send(&mut s, answer).await;
        });
        let client = || AgentClient::connect(&uds, 1024);
        client()
            .await
            .unwrap()
            .copy_in("/tmp", &b"good"[..])
            .await
            .unwrap();
        let err = client()
            .await
            .unwrap()
            .copy_in("/tmp", &b"bad"[..])
            .await
            .unwrap_err();
        assert!(matches!(err, ProtoError::Agent { .. }), "{err:?}");
        assert_eq!(err.to_string(), "reading the archive: not a tar");
        /// A source that fails on the first read.
        struct Broken;
        impl AsyncRead for Broken {
            fn poll_read(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
                _: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::task::Poll::Ready(Err(std::io::Error::other("the client went away")))
            }
        }
        let err = client()
            .await
            .unwrap()
            .copy_in("/tmp", Broken)
            .await
            .unwrap_err();
        assert!(matches!(err, ProtoError::Input(_)), "{err:?}");
    }

    #[tokio::test]
    async fn copy_out_streams_and_a_late_failure_is_a_read_error() {
        let dir = tempfile::tempdir().unwrap();
        let uds = fake(dir.path(), "OK 7\n", |mut s| async move {
            hello(&mut s).await;
            let Some(Frame::Message(Message::CopyOut { path })) = read(&mut s).await.unwrap()
            else {
                panic!("no copy out")
            };
            write(&mut s, &Frame::Data(Kind::Data, b"part one ".to_vec()))
                .await
                .unwrap();
            write(&mut s, &Frame::Data(Kind::Data, b"part two".to_vec()))
                .await
                .unwrap();
            let end = if path == "/ok" {
                Message::DataEof
            } else {
                Message::Error {
                    message: "disk on fire".into(),
                    code: None,
                }
            };
            send(&mut s, end).await.unwrap();
        });
        let mut r = AgentClient::connect(&uds, 1024)
            .await
            .unwrap()
            .copy_out("/ok")
            .await
            .unwrap();
        let mut all = Vec::new();
        r.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"part one part two");
        let mut r = AgentClient::connect(&uds, 1024)
            .await
            .unwrap()
            .copy_out("/bad")
            .await
            .unwrap();
        let err = r.read_to_end(&mut Vec::new()).await.unwrap_err();
        assert!(err.to_string().contains("disk on fire"), "{err}");
    }

    #[tokio::test]
    async fn port_reports_stream_until_the_session_ends_and_a_forward_carries_raw_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let uds = fake(dir.path(), "OK 7\n", |mut s| async move {
            hello(&mut s).await;
            match read(&mut s).await.unwrap() {
                Some(Frame::Message(Message::WatchPorts)) => {
                    let reports = [(vec![22, 8080], vec![5353]), (vec![22], vec![])];
                    for (ports, udp) in reports {
                        send(&mut s, Message::Ports { ports, udp }).await.unwrap();
                    }
                    // What an agent from before UDP sends.
                    let old = br#"{"type":"ports","ports":[80]}"#;
                    s.write_all(&[0, 0, 0, 0, old.len() as u8]).await.unwrap();
                    s.write_all(old).await.unwrap();
                }
                Some(Frame::Message(Message::ForwardUdp { port: 5353 })) => {
                    send(&mut s, Message::Done).await.unwrap();
                    // Echoes each datagram, the empty one too, as one frame each.
                    while let Some(Frame::Data(Kind::Data, d)) = read(&mut s).await.unwrap() {
                        write(&mut s, &Frame::Data(Kind::Data, d)).await.unwrap();
                    }
                }
                Some(Frame::Message(Message::Forward { port: 8080 })) => {
                    send(&mut s, Message::Done).await.unwrap();
                    let mut buf = [0u8; 4];
                    s.read_exact(&mut buf).await.unwrap();
                    s.write_all(&buf).await.unwrap();
                }
                Some(Frame::Message(Message::Forward { port })) => {
                    let refused = Message::Error {
                        message: format!("nothing listens on port {port}"),
                        code: None,
                    };
                    send(&mut s, refused).await.unwrap();
                }
                other => panic!("{other:?}"),
            }
        });
        let client = || AgentClient::connect(&uds, 1024);
        let mut watch = client().await.unwrap().watch_ports().await.unwrap();
        let ports = |tcp: &[u16], udp: &[u16]| GuestPorts {
            tcp: tcp.to_vec(),
            udp: udp.to_vec(),
        };
        assert_eq!(watch.next().await.unwrap(), ports(&[22, 8080], &[5353]));
        assert_eq!(watch.next().await.unwrap(), ports(&[22], &[]));
        assert_eq!(watch.next().await.unwrap(), ports(&[80], &[]));
        assert!(matches!(watch.next().await, Err(ProtoError::Closed)));
        let (mut tx, mut rx) = client().await.unwrap().forward_udp(5353).await.unwrap();
        for datagram in [&b"query"[..], b"", &[7u8; 65507]] {
            tx.send(datagram).await.unwrap();
            assert_eq!(rx.recv().await.unwrap().unwrap(), datagram);
        }
        drop(tx);
        assert!(rx.recv().await.is_none());
        let mut conn = client().await.unwrap().forward_raw(8080).await.unwrap();
        conn.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        conn.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"ping");
        let err = client().await.unwrap().forward(9).await.unwrap_err();
        assert!(
            err.to_string().contains("nothing listens on port 9"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_client_that_half_closes_still_gets_the_reply_from_an_agent_that_passes_it_on() {
        let dir = tempfile::tempdir().unwrap();
        // A server that answers once it has read the whole request, as the agent gives it.
        let uds = fake(dir.path(), "OK 9\n", |mut s| async move {
            hello_with(&mut s, true).await;
            match read(&mut s).await.unwrap() {
                Some(Frame::Message(Message::ForwardStream { port: 7 })) => {}
                other => panic!("{other:?}"),
            }
            send(&mut s, Message::Done).await.unwrap();
            let mut request = Vec::new();
            loop {
                match read(&mut s).await.unwrap() {
                    Some(Frame::Data(Kind::Data, d)) => request.extend(d),
                    Some(Frame::Message(Message::DataEof)) => break,
                    other => panic!("{other:?}"),
                }
            }
            let answer = format!("read {} bytes", request.len());
            s.write_all(answer.as_bytes()).await.unwrap();
            s.shutdown().await.unwrap();
        });
        let forwarded = AgentClient::connect(&uds, 1024)
            .await
            .unwrap()
            .forward(7)
            .await
            .unwrap();
        let (mut client, relayed) = tokio::io::duplex(4096);
        let relay = tokio::spawn(forwarded.relay(relayed, 1000));
        client.write_all(&[1u8; 2500]).await.unwrap();
        client.shutdown().await.unwrap();
        let mut reply = String::new();
        client.read_to_string(&mut reply).await.unwrap();
        assert_eq!(reply, "read 2500 bytes");
        relay.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn garbage_from_the_agent_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let uds = fake(dir.path(), "OK 7\n", |mut s| async move {
            hello(&mut s).await;
            let _ = read(&mut s).await;
            let _ = s.write_all(&[0xee, 0, 0, 0, 1, 0]).await;
        });
        let err = AgentClient::connect(&uds, 1024)
            .await
            .unwrap()
            .ping()
            .await
            .unwrap_err();
        assert!(matches!(err, ProtoError::UnknownKind(0xee)), "{err:?}");
    }

    /// Plays the agent's side of the readiness report: connects to the ready socket and
    /// sends `m`; the connection, for the host's answer.
    async fn report(path: &Path, m: Message) -> UnixStream {
        let mut s = UnixStream::connect(path).await.unwrap();
        send(&mut s, m).await.unwrap();
        s
    }

    #[tokio::test]
    async fn readiness_waits_for_the_agents_report_before_connecting() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let ready = ReadyListener::bind(&uds, 1025).unwrap();
        assert_eq!(ready.path(), dir.path().join("vsock.sock_1025"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(ready.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        // The device accepts from the start, as vhost-device-vsock does; the report comes late.
        let reported = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let early = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (r, e) = (reported.clone(), early.clone());
        fake(dir.path(), "OK 7\n", move |mut s| {
            let (r, e) = (r.clone(), e.clone());
            async move {
                e.fetch_or(
                    !r.load(std::sync::atomic::Ordering::SeqCst),
                    std::sync::atomic::Ordering::SeqCst,
                );
                hello(&mut s).await;
                let _ = read(&mut s).await;
                let pong = Message::Pong {
                    uptime_ms: 1500,
                    init_pid: 1,
                    init_running: true,
                    booted: true,
                };
                let _ = send(&mut s, pong).await;
            }
        });
        let path = ready.path().to_path_buf();
        let agent = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            // Whatever else reaches the socket is not a report.
            report(&path, Message::Ping).await;
            drop(UnixStream::connect(&path).await.unwrap());
            reported.store(true, std::sync::atomic::Ordering::SeqCst);
            let agent = "0.1.0".to_string();
            let mut s = report(
                &path,
                Message::Ready {
                    version: crate::VERSION,
                    agent,
                },
            )
            .await;
            // The agent stops repeating its report once the host acknowledges it.
            let ack = read(&mut s).await.unwrap();
            assert_eq!(ack, Some(Frame::Message(Message::Done)));
        });
        let readiness = wait_ready(&ready, &uds, 1024, Instant::now() + Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(
            readiness,
            Readiness {
                uptime: Duration::from_millis(1500),
                init_running: true,
                booted: true,
            }
        );
        assert!(
            !early.load(std::sync::atomic::Ordering::SeqCst),
            "the host connected before the agent said it was ready"
        );
        agent.await.unwrap();
        // Nothing more comes: the deadline ends the wait.
        let err = ready
            .wait(Instant::now() + Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(err, ProtoError::Timeout), "{err:?}");
        let path = ready.path().to_path_buf();
        drop(ready);
        assert!(!path.exists(), "the socket goes with the listener");
    }

    #[tokio::test]
    async fn an_agent_of_another_protocol_version_is_refused_at_its_report() {
        let dir = tempfile::tempdir().unwrap();
        // A stale socket from a crashed run is replaced.
        drop(std::os::unix::net::UnixListener::bind(dir.path().join("vsock.sock_1025")).unwrap());
        let ready = ReadyListener::bind(&dir.path().join("vsock.sock"), 1025).unwrap();
        let path = ready.path().to_path_buf();
        tokio::spawn(async move {
            let agent = "0.0.1".to_string();
            report(
                &path,
                Message::Ready {
                    version: crate::VERSION + 1,
                    agent,
                },
            )
            .await;
        });
        let err = ready
            .wait(Instant::now() + Duration::from_secs(10))
            .await
            .unwrap_err();
        assert!(matches!(err, ProtoError::Refused(_)), "{err:?}");
        assert!(err.to_string().contains("0.0.1"), "{err}");
    }
}
