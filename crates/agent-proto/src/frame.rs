//! The frame codec. A frame is one kind byte, a big-endian u32 payload length and the
//! payload; kind 0 carries a JSON [`Message`], the others raw bytes. Decoding never panics
//! and never allocates more than [`MAX_FRAME`] for one frame, whatever the input.

use crate::Message;

/// Largest payload of one frame.
pub const MAX_FRAME: usize = 1 << 20;

/// Length of a frame header.
pub const HEADER_LEN: usize = 5;

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// A JSON control message.
    Message = 0,
    /// Process input (host to agent).
    Stdin = 1,
    /// Process output; with a tty, everything the process writes.
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
    /// Raw bytes of a data kind (never [`Kind::Message`]).
    Data(Kind, Vec<u8>),
}

/// Why a session failed.
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
    #[error("the guest agent is not listening yet (vsock answered {answer:?})")]
    NotListening { answer: String },
    /// The agent refused the hello (another protocol version).
    #[error("the guest agent refused the session: {0}")]
    Refused(String),
    /// The agent refused the request; `code` is 126/127 for an exec that could not start.
    #[error("{message}")]
    Agent { message: String, code: Option<i32> },
    #[error("the guest agent closed the session")]
    Closed,
    #[error("unexpected frame from the peer: {0}")]
    Unexpected(String),
    #[error("the guest agent did not answer in time")]
    Timeout,
    /// The data the host was sending could not be read (its source failed, not the session).
    #[error("reading the data to send")]
    Input(#[source] std::io::Error),
}

impl ProtoError {
    /// An unexpected frame, described briefly (payloads can be large).
    pub fn unexpected(frame: Option<&Frame>) -> ProtoError {
        ProtoError::Unexpected(match frame {
            None => "end of stream".to_string(),
            Some(Frame::Message(m)) => format!("{m:?}"),
            Some(Frame::Data(k, b)) => format!("{k:?} data of {} bytes", b.len()),
        })
    }
}

/// Encodes a frame. Data longer than [`MAX_FRAME`] becomes several frames of its kind.
pub fn encode(frame: &Frame) -> Vec<u8> {
    match frame {
        Frame::Message(m) => {
            // Serialising these types cannot fail: no maps, no non-string keys.
            let payload = serde_json::to_vec(m).expect("messages serialise");
            let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
            push_frame(&mut out, Kind::Message, &payload);
            out
        }
        Frame::Data(k, b) => {
            let mut out = Vec::with_capacity(HEADER_LEN + b.len());
            if b.is_empty() {
                push_frame(&mut out, *k, b);
            }
            for chunk in b.chunks(MAX_FRAME) {
                push_frame(&mut out, *k, chunk);
            }
            out
        }
    }
}

fn push_frame(out: &mut Vec<u8>, kind: Kind, payload: &[u8]) {
    out.push(kind as u8);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
}

/// Decodes a frame from its header fields and payload.
pub fn decode(kind: u8, payload: Vec<u8>) -> Result<Frame, ProtoError> {
    match Kind::from_u8(kind) {
        Some(Kind::Message) => Ok(Frame::Message(serde_json::from_slice(&payload)?)),
        Some(k) => Ok(Frame::Data(k, payload)),
        None => Err(ProtoError::UnknownKind(kind)),
    }
}

/// Parses a header into kind and length, checking the kind and the bound before anyone
/// allocates for the payload.
pub fn header(h: [u8; HEADER_LEN]) -> Result<(u8, usize), ProtoError> {
    if Kind::from_u8(h[0]).is_none() {
        return Err(ProtoError::UnknownKind(h[0]));
    }
    let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
    if len > MAX_FRAME {
        return Err(ProtoError::TooLarge(len));
    }
    Ok((h[0], len))
}

/// Decodes the first frame of `buf`: the frame and the bytes it took, or `None` when `buf`
/// holds only part of one. The fuzz-friendly entry point.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Frame, usize)>, ProtoError> {
    let Some(h) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let (kind, len) = header(*h)?;
    let Some(payload) = buf.get(HEADER_LEN..HEADER_LEN + len) else {
        return Ok(None);
    };
    Ok(Some((decode(kind, payload.to_vec())?, HEADER_LEN + len)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ExecRequest;
    use proptest::prelude::*;

    fn message() -> impl Strategy<Value = Message> {
        prop_oneof![
            any::<u32>().prop_map(|version| Message::Hello { version }),
            (any::<u32>(), ".*", any::<bool>()).prop_map(|(version, agent, half_close)| {
                Message::HelloOk {
                    version,
                    agent,
                    half_close,
                }
            }),
            (
                proptest::collection::vec(".*", 0..4),
                proptest::option::of(".*"),
                ".*",
                any::<Option<u32>>(),
                any::<bool>(),
                any::<(u16, u16)>()
            )
                .prop_map(|(argv, arg0, cwd, uid, tty, (rows, cols))| {
                    Message::Exec(ExecRequest {
                        argv,
                        arg0,
                        cwd,
                        uid,
                        tty,
                        rows,
                        cols,
                        ..Default::default()
                    })
                }),
            any::<i32>().prop_map(|pid| Message::Started { pid }),
            (any::<Option<i32>>(), any::<Option<i32>>())
                .prop_map(|(code, signal)| Message::Exit { code, signal }),
            ".*".prop_map(|path| Message::CopyIn { path }),
            (any::<Option<i32>>(), any::<u64>())
                .prop_map(|(signal, timeout_ms)| Message::Shutdown { signal, timeout_ms }),
            (".*", any::<Option<i32>>())
                .prop_map(|(message, code)| Message::Error { message, code }),
            Just(Message::StdinEof),
            Just(Message::Ping),
        ]
    }

    fn frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            message().prop_map(Frame::Message),
            (
                prop_oneof![
                    Just(Kind::Stdin),
                    Just(Kind::Stdout),
                    Just(Kind::Stderr),
                    Just(Kind::Data)
                ],
                proptest::collection::vec(any::<u8>(), 0..300)
            )
                .prop_map(|(k, b)| Frame::Data(k, b)),
        ]
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(matches!(
            decode_frame(&[9u8, 0, 0, 0, 0]),
            Err(ProtoError::UnknownKind(9))
        ));
        assert!(matches!(
            decode_frame(&[0u8, 0xff, 0, 0, 0]),
            Err(ProtoError::TooLarge(_))
        ));
        assert!(matches!(
            decode_frame(&[0u8, 0, 0, 0, 2, b'{', b'}']),
            Err(ProtoError::Malformed(_))
        ));
        // A known type with a field it does not have.
        let extra = br#"{"type":"signal","signal":9,"x":1}"#;
        let mut buf = vec![0u8, 0, 0, 0, extra.len() as u8];
        buf.extend_from_slice(extra);
        assert!(matches!(decode_frame(&buf), Err(ProtoError::Malformed(_))));
        assert!(matches!(decode_frame(&[2u8, 0, 0, 0, 9, 1]), Ok(None)));
    }

    #[test]
    fn oversized_data_is_split_into_valid_frames() {
        let big = vec![7u8; MAX_FRAME * 2 + 3];
        let bytes = encode(&Frame::Data(Kind::Stdout, big.clone()));
        let mut at = 0;
        let mut joined = Vec::new();
        while let Some((f, n)) = decode_frame(&bytes[at..]).unwrap() {
            let Frame::Data(Kind::Stdout, b) = f else {
                panic!("not stdout")
            };
            joined.extend_from_slice(&b);
            at += n;
        }
        assert_eq!(at, bytes.len());
        assert_eq!(joined, big);
    }

    proptest! {
        #[test]
        fn frames_round_trip(frames in proptest::collection::vec(frame(), 0..8)) {
            let bytes: Vec<u8> = frames.iter().flat_map(encode).collect();
            let mut at = 0;
            let mut decoded = Vec::new();
            while let Some((f, n)) = decode_frame(&bytes[at..]).unwrap() {
                decoded.push(f);
                at += n;
            }
            prop_assert_eq!(at, bytes.len());
            prop_assert_eq!(decoded, frames);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut at = 0;
            while let Ok(Some((_, n))) = decode_frame(&bytes[at..]) {
                prop_assert!(n >= HEADER_LEN);
                at += n;
            }
        }

        #[test]
        fn truncated_frames_ask_for_more(f in frame(), cut in any::<prop::sample::Index>()) {
            let bytes = encode(&f);
            let cut = cut.index(bytes.len());
            prop_assert!(matches!(decode_frame(&bytes[..cut]), Ok(None)));
        }
    }
}
