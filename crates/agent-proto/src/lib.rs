//! The protocol between the container service (host) and `container-agent` (guest), one
//! session per vsock connection, and the boot config the agent reads at start.
//!
//! A frame is one kind byte, a big-endian u32 length and the payload. Kind 0 carries a JSON
//! [`Message`]; the data kinds carry raw bytes. A session starts with `Hello` from the host
//! and `HelloOk` from the agent, then one operation. Frames are bounded ([`MAX_FRAME`]) and
//! unknown kinds are errors, so garbage from either side ends a session, never the peer.

use serde::{Deserialize, Serialize};

/// Protocol version; the agent refuses a host speaking another.
pub const VERSION: u32 = 1;
/// The vsock port the agent listens on.
pub const PORT: u32 = 1024;
/// Largest payload of one frame.
pub const MAX_FRAME: usize = 1 << 20;
/// Where the boot config sits in the initramfs.
pub const BOOT_CONFIG_PATH: &str = "/container/boot.json";
/// The line the agent prints just before it starts the image's init: everything before it in
/// the console is the boot log.
pub const INIT_MARKER: &str = "container-agent: starting init";

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Message = 0,
    Stdin = 1,
    Stdout = 2,
    Stderr = 3,
    /// A chunk of a tar stream (copy in or out).
    Data = 4,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            0 => Kind::Message,
            1 => Kind::Stdin,
            2 => Kind::Stdout,
            3 => Kind::Stderr,
            4 => Kind::Data,
            _ => return None,
        })
    }
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Message(Message),
    Data(Kind, Vec<u8>),
}

/// Control messages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Message {
    Hello {
        version: u32,
    },
    HelloOk {
        version: u32,
        agent: String,
    },
    /// Start a process.
    Exec(ExecRequest),
    Started {
        pid: i32,
    },
    StdinEof,
    Resize {
        rows: u16,
        cols: u16,
    },
    Signal {
        signal: i32,
    },
    Exit {
        code: Option<i32>,
        signal: Option<i32>,
    },
    /// Unpack the tar stream that follows (data frames, then `DataEof`) at `path`: into it
    /// when it is a directory, else as it (the archive's top entry renamed).
    CopyIn {
        path: String,
    },
    /// Send a tar stream of `path` (its base name at the top).
    CopyOut {
        path: String,
    },
    DataEof,
    Done,
    Shutdown {
        signal: Option<i32>,
        timeout_ms: u64,
    },
    SetTime {
        unix_ns: u64,
    },
    Ping,
    Pong {
        uptime_ms: u64,
        init_pid: i32,
    },
    /// The operation failed; `code` follows the shell convention where it applies
    /// (126 not executable, 127 not found).
    Error {
        message: String,
        code: Option<i32>,
    },
}

/// A process to start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    pub arg0: Option<String>,
    pub env: Vec<String>,
    pub cwd: String,
    /// A numeric user, or a name the agent resolves in the guest's /etc/passwd.
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub user: Option<String>,
    pub tty: bool,
    pub rows: u16,
    pub cols: u16,
}

/// How a machine shares its user's home.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HomeMount {
    Rw,
    Ro,
    None,
}

/// A virtio-fs share to mount.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Share {
    pub tag: String,
    pub guest_path: String,
    pub read_only: bool,
}

/// The machine user to provision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserSpec {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
    pub shell: String,
}

/// Guest network settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    pub interface: String,
    pub address_cidr: String,
    pub gateway: String,
    pub nameservers: Vec<String>,
}

/// What the agent needs to bring a machine up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootConfig {
    pub version: u32,
    pub machine_id: String,
    pub hostname: String,
    pub root_device: String,
    pub grow_root: bool,
    /// Module files in the initramfs, in load order.
    pub modules: Vec<String>,
    pub shares: Vec<Share>,
    pub user: Option<UserSpec>,
    pub home_mount: HomeMount,
    pub network: Option<NetConfig>,
    pub vsock_port: u32,
    pub time_unix_ns: u64,
    pub init: Vec<String>,
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("agent connection failed")]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("malformed message")]
    Malformed(#[from] serde_json::Error),
}

/// Encodes a frame.
pub fn encode(frame: &Frame) -> Vec<u8> {
    let (kind, payload): (u8, std::borrow::Cow<'_, [u8]>) = match frame {
        Frame::Message(m) => (
            Kind::Message as u8,
            serde_json::to_vec(m).expect("messages serialise").into(),
        ),
        Frame::Data(k, b) => (*k as u8, b.as_slice().into()),
    };
    let mut out = Vec::with_capacity(5 + payload.len());
    out.push(kind);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Decodes a frame from its header fields and payload.
pub fn decode(kind: u8, payload: Vec<u8>) -> Result<Frame, ProtoError> {
    match Kind::from_u8(kind) {
        Some(Kind::Message) => Ok(Frame::Message(serde_json::from_slice(&payload)?)),
        Some(k) => Ok(Frame::Data(k, payload)),
        None => Err(ProtoError::UnknownKind(kind)),
    }
}

/// Parses a 5-byte header into kind and length, checking the bound.
pub fn header(h: [u8; 5]) -> Result<(u8, usize), ProtoError> {
    let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
    if len > MAX_FRAME {
        return Err(ProtoError::TooLarge(len));
    }
    Ok((h[0], len))
}

/// Blocking frame I/O (the agent).
pub mod sync {
    use std::io::{Read, Write};

    use super::*;

    pub fn write<W: Write>(w: &mut W, frame: &Frame) -> std::io::Result<()> {
        w.write_all(&encode(frame))?;
        w.flush()
    }

    pub fn send<W: Write>(w: &mut W, m: Message) -> std::io::Result<()> {
        write(w, &Frame::Message(m))
    }

    /// Reads a frame; `None` at a clean end of stream.
    pub fn read<R: Read>(r: &mut R) -> Result<Option<Frame>, ProtoError> {
        let mut h = [0u8; 5];
        match r.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let (kind, len) = header(h)?;
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload)?;
        decode(kind, payload).map(Some)
    }
}

/// Async frame I/O and connecting (the host).
#[cfg(feature = "host")]
pub mod host {
    use std::path::Path;
    use std::time::{Duration, Instant};

    use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    use tokio::net::UnixStream;

    use super::*;

    pub async fn write<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame) -> std::io::Result<()> {
        w.write_all(&encode(frame)).await?;
        w.flush().await
    }

    pub async fn send<W: AsyncWrite + Unpin>(w: &mut W, m: Message) -> std::io::Result<()> {
        write(w, &Frame::Message(m)).await
    }

    pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>, ProtoError> {
        let mut h = [0u8; 5];
        match r.read_exact(&mut h).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let (kind, len) = header(h)?;
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload).await?;
        decode(kind, payload).map(Some)
    }

    /// Opens a session: the hybrid-vsock handshake of vhost-device-vsock (`CONNECT <port>`,
    /// `OK <n>`), then ours.
    pub async fn connect(uds: &Path, port: u32) -> Result<UnixStream, ProtoError> {
        let stream = UnixStream::connect(uds).await?;
        let mut stream = tokio::io::BufReader::new(stream);
        stream
            .get_mut()
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .await?;
        let mut line = String::new();
        stream.read_line(&mut line).await?;
        if !line.starts_with("OK ") {
            return Err(ProtoError::Io(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                format!("the guest agent is not listening yet ({})", line.trim()),
            )));
        }
        let mut stream = stream.into_inner();
        send(&mut stream, Message::Hello { version: VERSION }).await?;
        match read(&mut stream).await? {
            Some(Frame::Message(Message::HelloOk { .. })) => Ok(stream),
            Some(Frame::Message(Message::Error { message, .. })) => Err(ProtoError::Io(
                std::io::Error::other(format!("the guest agent refused the session: {message}")),
            )),
            other => Err(ProtoError::Io(std::io::Error::other(format!(
                "unexpected answer to hello from the guest agent: {other:?}"
            )))),
        }
    }

    /// One request, one answer (ping, shutdown, set time).
    pub async fn call(uds: &Path, port: u32, m: Message) -> Result<Message, ProtoError> {
        let mut s = connect(uds, port).await?;
        send(&mut s, m).await?;
        match read(&mut s).await? {
            Some(Frame::Message(reply)) => Ok(reply),
            other => Err(ProtoError::Io(std::io::Error::other(format!(
                "unexpected answer from the guest agent: {other:?}"
            )))),
        }
    }

    /// Waits until the agent answers a ping, or `deadline`.
    pub async fn wait_ready(
        uds: &Path,
        port: u32,
        deadline: Instant,
    ) -> Result<Message, ProtoError> {
        loop {
            let attempt =
                tokio::time::timeout(Duration::from_secs(2), call(uds, port, Message::Ping)).await;
            match attempt {
                Ok(Ok(m @ Message::Pong { .. })) => return Ok(m),
                Ok(Ok(other)) => {
                    return Err(ProtoError::Io(std::io::Error::other(format!(
                        "unexpected answer to ping: {other:?}"
                    ))));
                }
                Ok(Err(e)) if Instant::now() >= deadline => return Err(e),
                Err(_) if Instant::now() >= deadline => {
                    return Err(ProtoError::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the guest agent did not answer",
                    )));
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frames_round_trip() {
        let frames = vec![
            Frame::Message(Message::Hello { version: 1 }),
            Frame::Message(Message::Exec(ExecRequest {
                argv: vec!["sh".into()],
                tty: true,
                ..Default::default()
            })),
            Frame::Data(Kind::Stdout, b"hi".to_vec()),
            Frame::Message(Message::Exit {
                code: None,
                signal: Some(9),
            }),
        ];
        let mut buf = Vec::new();
        for f in &frames {
            sync::write(&mut buf, f).unwrap();
        }
        let mut r = buf.as_slice();
        for f in &frames {
            assert_eq!(&sync::read(&mut r).unwrap().unwrap(), f);
        }
        assert!(sync::read(&mut r).unwrap().is_none());
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(matches!(
            sync::read(&mut &[9u8, 0, 0, 0, 0][..]),
            Err(ProtoError::UnknownKind(9))
        ));
        assert!(matches!(
            sync::read(&mut &[0u8, 0xff, 0, 0, 0][..]),
            Err(ProtoError::TooLarge(_))
        ));
        assert!(matches!(
            sync::read(&mut &[0u8, 0, 0, 0, 2, b'{', b'}'][..]),
            Err(ProtoError::Malformed(_))
        ));
        assert!(sync::read(&mut &[2u8, 0, 0, 0, 9, 1][..]).is_err());
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut r = bytes.as_slice();
            while let Ok(Some(_)) = sync::read(&mut r) {}
        }
    }
}
