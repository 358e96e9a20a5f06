//! The writing half of a session: the host's end of the vsock stream, shared by the threads
//! that answer on it (an exec's output pumps and its exit, a copy's tar stream), and the
//! messages every request handler answers with.
//!
//! Each frame is written whole under the lock, so frames of different threads never
//! interleave. The handlers (`exec`, `copy`) and the server that dispatches to them all
//! write through here; this module depends on none of them.

use std::sync::{Arc, Mutex};

use container_agent_proto::sync::{send, write};
use container_agent_proto::{Frame, Kind, Message};
use vsock::VsockStream;

/// The writing half of a session, shared by the threads that produce its frames.
pub type Writer = Arc<Mutex<VsockStream>>;

/// Sends a message on a shared writer.
pub fn reply(w: &Writer, m: Message) -> std::io::Result<()> {
    send(&mut *lock(w), m)
}

/// Sends one data frame of `kind` on a shared writer.
pub fn data(w: &Writer, kind: Kind, bytes: &[u8]) -> std::io::Result<()> {
    write(&mut *lock(w), &Frame::Data(kind, bytes.to_vec()))
}

/// An error answer: the error and its causes on one line. The one place a failure is worded
/// for the host (the console's are `main` and the server's session log).
pub fn error(e: impl Into<anyhow::Error>, code: Option<i32>) -> Message {
    Message::Error {
        message: format!("{:#}", e.into()),
        code,
    }
}

/// The stream, poisoned or not: a thread that panicked mid-frame has already broken the
/// stream for the host, and the others must still be able to end the session.
fn lock(w: &Writer) -> std::sync::MutexGuard<'_, VsockStream> {
    w.lock().unwrap_or_else(|p| p.into_inner())
}
