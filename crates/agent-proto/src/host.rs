//! Async frame I/O and the session opening, for the host: the hybrid-vsock handshake of
//! vhost-device-vsock (`CONNECT <port>\n` → `OK <n>\n` on its Unix socket), then ours.
//! [`crate::client`] builds the typed API on these; the host uses nothing else (the frame
//! functions serve tests that play the agent).

use std::path::Path;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::frame::{HEADER_LEN, decode, encode, header};
use crate::{Frame, Message, ProtoError, VERSION};

/// Longest answer line of the hybrid-vsock handshake we accept.
const MAX_CONNECT_LINE: u64 = 256;

/// Writes one frame (several for oversized data) and flushes.
pub async fn write<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame) -> std::io::Result<()> {
    w.write_all(&encode(frame)).await?;
    w.flush().await
}

/// Writes a control message.
pub async fn send<W: AsyncWrite + Unpin>(w: &mut W, m: Message) -> std::io::Result<()> {
    write(w, &Frame::Message(m)).await
}

/// Reads a frame; `None` at a clean end of stream (between frames).
pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>, ProtoError> {
    let mut h = [0u8; HEADER_LEN];
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

/// What the agent said of itself when it took the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Its version string (its crate version).
    pub agent: String,
    /// Whether it serves [`Message::ForwardStream`].
    pub half_close: bool,
}

/// Opens a session and says hello; returns the stream and what the agent said of itself.
pub async fn open(uds: &Path, port: u32) -> Result<(UnixStream, Hello), ProtoError> {
    let mut stream = UnixStream::connect(uds).await?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await?;
    // Byte by byte: nothing of our protocol may be swallowed by a read-ahead buffer.
    let mut line = Vec::new();
    let mut limited = (&mut stream).take(MAX_CONNECT_LINE);
    let mut reader = tokio::io::BufReader::with_capacity(1, &mut limited);
    reader.read_until(b'\n', &mut line).await?;
    let line = String::from_utf8_lossy(&line).trim().to_string();
    if !line.starts_with("OK ") {
        return Err(ProtoError::NotListening { answer: line });
    }
    send(&mut stream, Message::Hello { version: VERSION }).await?;
    match read(&mut stream).await? {
        Some(Frame::Message(Message::HelloOk {
            agent, half_close, ..
        })) => Ok((stream, Hello { agent, half_close })),
        Some(Frame::Message(Message::Error { message, .. })) => Err(ProtoError::Refused(message)),
        other => Err(ProtoError::unexpected(other.as_ref())),
    }
}
