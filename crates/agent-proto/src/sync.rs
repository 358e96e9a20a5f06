//! Blocking frame I/O, for the agent.

use std::io::{Read, Write};

use crate::frame::{HEADER_LEN, decode, encode, header};
use crate::{Frame, Message, ProtoError};

/// Writes one frame (several for oversized data) and flushes.
pub fn write<W: Write>(w: &mut W, frame: &Frame) -> std::io::Result<()> {
    w.write_all(&encode(frame))?;
    w.flush()
}

/// Writes a control message.
pub fn send<W: Write>(w: &mut W, m: Message) -> std::io::Result<()> {
    write(w, &Frame::Message(m))
}

/// Reads a frame; `None` at a clean end of stream (between frames).
pub fn read<R: Read>(r: &mut R) -> Result<Option<Frame>, ProtoError> {
    let mut h = [0u8; HEADER_LEN];
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ExecRequest, Kind};

    #[test]
    fn frames_round_trip_through_a_stream() {
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
            write(&mut buf, f).unwrap();
        }
        let mut r = buf.as_slice();
        for f in &frames {
            assert_eq!(&read(&mut r).unwrap().unwrap(), f);
        }
        assert!(read(&mut r).unwrap().is_none());
    }

    #[test]
    fn a_frame_cut_short_is_an_error_not_an_end() {
        assert!(read(&mut &[2u8, 0, 0, 0, 9, 1][..]).is_err());
        assert!(matches!(
            read(&mut &[9u8, 0, 0, 0, 0][..]),
            Err(ProtoError::UnknownKind(9))
        ));
    }
}
