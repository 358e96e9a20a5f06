//! Frames of an interactive session (`machine run`, `machine cp`) on an upgraded HTTP
//! connection. Each frame is one type byte, a big-endian u32 payload length, and the payload.
//! Data frames carry raw bytes; control frames carry JSON. Frames are bounded so a hostile peer
//! cannot make the other side allocate without limit.

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::ApiError;

/// Largest payload a frame may carry.
pub const MAX_FRAME: usize = 1 << 20;

/// One frame, in either direction.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// Client → service: bytes for the process's standard input.
    Stdin(Vec<u8>),
    /// Client → service: standard input is closed.
    StdinEof,
    /// Client → service: the terminal was resized.
    Resize { rows: u16, cols: u16 },
    /// Client → service: deliver a signal to the process.
    Signal(i32),
    /// Service → client: output (the pty's when there is one).
    Stdout(Vec<u8>),
    /// Service → client: error output.
    Stderr(Vec<u8>),
    /// Service → client: the process started (with `-d`, the session ends here).
    Started { pid: i32 },
    /// Service → client: the process ended with a code, or died of a signal.
    Exit(ExitStatus),
    /// Service → client: the session failed before or while the process ran.
    Error(ApiError),
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl ExitStatus {
    /// The shell convention: the code, or 128 + the signal.
    pub fn shell_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => 255,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct ResizeBody {
    rows: u16,
    cols: u16,
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("session connection failed")]
    Io(#[from] std::io::Error),
    #[error("session frame of {0} bytes exceeds the limit of {MAX_FRAME}")]
    TooLarge(usize),
    #[error("unknown session frame type {0}")]
    UnknownType(u8),
    #[error("malformed session frame")]
    Malformed(#[source] serde_json::Error),
}

impl Frame {
    fn type_and_payload(&self) -> (u8, Vec<u8>) {
        let json = |v: &dyn erased::Json| v.to_json();
        match self {
            Frame::Stdin(b) => (1, b.clone()),
            Frame::StdinEof => (2, Vec::new()),
            Frame::Resize { rows, cols } => (
                3,
                json(&ResizeBody {
                    rows: *rows,
                    cols: *cols,
                }),
            ),
            Frame::Signal(s) => (4, s.to_be_bytes().to_vec()),
            Frame::Stdout(b) => (5, b.clone()),
            Frame::Stderr(b) => (6, b.clone()),
            Frame::Started { pid } => (7, pid.to_be_bytes().to_vec()),
            Frame::Exit(status) => (8, json(status)),
            Frame::Error(e) => (9, json(e)),
        }
    }

    /// Decodes a frame from its type and payload.
    pub fn decode(kind: u8, payload: Vec<u8>) -> Result<Frame, FrameError> {
        let int = |p: &[u8]| -> Result<i32, FrameError> {
            let bytes: [u8; 4] = p.try_into().map_err(|_| {
                FrameError::Malformed(serde_json::Error::io(std::io::Error::other(
                    "expected a 4-byte integer",
                )))
            })?;
            Ok(i32::from_be_bytes(bytes))
        };
        Ok(match kind {
            1 => Frame::Stdin(payload),
            2 => Frame::StdinEof,
            3 => {
                let r: ResizeBody =
                    serde_json::from_slice(&payload).map_err(FrameError::Malformed)?;
                Frame::Resize {
                    rows: r.rows,
                    cols: r.cols,
                }
            }
            4 => Frame::Signal(int(&payload)?),
            5 => Frame::Stdout(payload),
            6 => Frame::Stderr(payload),
            7 => Frame::Started {
                pid: int(&payload)?,
            },
            8 => Frame::Exit(serde_json::from_slice(&payload).map_err(FrameError::Malformed)?),
            9 => Frame::Error(serde_json::from_slice(&payload).map_err(FrameError::Malformed)?),
            other => return Err(FrameError::UnknownType(other)),
        })
    }

    /// Writes the frame.
    pub async fn write<W: AsyncWrite + Unpin>(&self, w: &mut W) -> std::io::Result<()> {
        let (kind, payload) = self.type_and_payload();
        let mut buf = Vec::with_capacity(5 + payload.len());
        buf.push(kind);
        buf.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        buf.extend_from_slice(&payload);
        w.write_all(&buf).await?;
        w.flush().await
    }

    /// Reads one frame; `None` at a clean end of stream.
    pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>, FrameError> {
        let mut header = [0u8; 5];
        match r.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if len > MAX_FRAME {
            return Err(FrameError::TooLarge(len));
        }
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload).await?;
        Frame::decode(header[0], payload).map(Some)
    }
}

mod erased {
    /// Object-safe JSON encoding for the control frames.
    pub trait Json {
        fn to_json(&self) -> Vec<u8>;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> Vec<u8> {
            serde_json::to_vec(self).expect("control frames always serialise")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip() {
        let frames = vec![
            Frame::Stdin(b"hello".to_vec()),
            Frame::StdinEof,
            Frame::Resize {
                rows: 40,
                cols: 120,
            },
            Frame::Signal(2),
            Frame::Stdout(vec![0, 255, 10]),
            Frame::Stderr(Vec::new()),
            Frame::Started { pid: 77 },
            Frame::Exit(ExitStatus {
                code: None,
                signal: Some(9),
            }),
            Frame::Error(ApiError::not_found("machine dev not found")),
        ];
        let mut buf = Vec::new();
        for f in &frames {
            f.write(&mut buf).await.unwrap();
        }
        let mut r = buf.as_slice();
        for f in &frames {
            assert_eq!(&Frame::read(&mut r).await.unwrap().unwrap(), f);
        }
        assert!(Frame::read(&mut r).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn hostile_frames_are_errors_not_panics() {
        let mut huge: &[u8] = &[1, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            Frame::read(&mut huge).await,
            Err(FrameError::TooLarge(_))
        ));
        let mut unknown: &[u8] = &[200, 0, 0, 0, 0];
        assert!(matches!(
            Frame::read(&mut unknown).await,
            Err(FrameError::UnknownType(200))
        ));
        let mut bad_json: &[u8] = &[8, 0, 0, 0, 1, b'{'];
        assert!(matches!(
            Frame::read(&mut bad_json).await,
            Err(FrameError::Malformed(_))
        ));
        let mut short_int: &[u8] = &[4, 0, 0, 0, 1, 9];
        assert!(Frame::read(&mut short_int).await.is_err());
        let mut truncated: &[u8] = &[1, 0, 0, 0, 9, 1];
        assert!(matches!(
            Frame::read(&mut truncated).await,
            Err(FrameError::Io(_))
        ));
    }

    #[test]
    fn shell_code_follows_the_convention() {
        assert_eq!(
            ExitStatus {
                code: Some(42),
                signal: None
            }
            .shell_code(),
            42
        );
        assert_eq!(
            ExitStatus {
                code: None,
                signal: Some(9)
            }
            .shell_code(),
            137
        );
    }
}
