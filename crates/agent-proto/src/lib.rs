//! The contract between the container service (host) and `container-agent` (guest): the boot
//! config the agent reads from its initramfs, and the session protocol spoken over vsock.
//!
//! One vsock connection carries one session. The host opens it with [`Message::Hello`], the
//! agent answers [`Message::HelloOk`] (or [`Message::Error`] for another version), then the
//! host sends one request and the two sides exchange the frames that request defines:
//!
//! | request | host then sends | agent sends |
//! |---|---|---|
//! | `Exec` | `Stdin` data, `StdinEof`, `Resize`, `Signal` | `Started`, `Stdout`/`Stderr` data, `Exit` — or one `Error` (code 126/127) instead of `Started` |
//! | `CopyIn` | tar in `Data` frames, `DataEof` | `Done` or `Error` |
//! | `CopyOut` | — | tar in `Data` frames, `DataEof` — or `Error` |
//! | `CopyRoot` | — | tar in `Data` frames, `DataEof` — or `Error` |
//! | `Shutdown` | — | `Done` once the stop signal is sent |
//! | `SetTime` | — | `Done` or `Error` |
//! | `Ping` | — | `Pong` |
//! | `Stats` | — | `StatsReport` or `Error` |
//! | `Reclaim` | — | `Done` or `Error` |
//! | `WatchPorts` | — (closes the session to end it) | `Ports` at once, then at each change |
//! | `Forward` | the connection's raw bytes, after `Done` | `Done` then raw bytes, or `Error` |
//! | `ForwardStream` (agents whose `HelloOk` says `half_close`) | the connection's bytes in `Data` frames, then `DataEof` (a half-close) | `Done` then raw bytes, or `Error` |
//! | `ForwardUdp` | one `Data` frame per datagram, after `Done` | `Done` then one `Data` frame per datagram, or `Error` |
//!
//! The agent opens connections the other way too: to the host's [`READY_PORT`] during boot,
//! carrying a single [`Message::Ready`] once the agent listens (only then does the host open
//! sessions, `client::ReadyListener`); and to [`SSH_AGENT_PORT`], one per client of the
//! forwarded SSH agent while an exec session asks for it (`ExecRequest::ssh_agent`), carrying
//! that client's raw bytes, no frames.
//!
//! A frame is one kind byte, a big-endian u32 length and the payload ([`frame`]). Frames are
//! bounded ([`MAX_FRAME`]) and unknown kinds are errors, so garbage from either side ends a
//! session, never the peer.
//!
//! Blocking frame I/O for the agent is in [`sync`]; the host side (tokio) is behind the
//! `host` feature: the frame-level [`host`] module and the typed [`client::AgentClient`].

pub mod boot;
pub mod copy;
pub mod frame;
pub mod message;
pub mod sync;

#[cfg(feature = "host")]
pub mod client;
#[cfg(feature = "host")]
pub mod host;

pub use boot::{BOOT_CONFIG_PATH, BootConfig, HomeMount, NetConfig, Share, UserSpec};
pub use frame::{Frame, Kind, MAX_FRAME, ProtoError, decode, decode_frame, encode, header};
pub use message::{ExecRequest, GuestMemory, Message};

/// Protocol version; the agent refuses a host speaking another.
pub const VERSION: u32 = 1;
/// The vsock port the agent listens on unless the boot config says otherwise.
pub const PORT: u32 = 1024;
/// The host port the agent reports its readiness to (guest to host) unless the boot config
/// says otherwise.
pub const READY_PORT: u32 = 1025;
/// The host port the agent relays each connection to the forwarded SSH agent to (guest to
/// host); the host connects it to the caller's own agent, as the caller.
pub const SSH_AGENT_PORT: u32 = 1026;
/// Where an exec session that forwards the host's SSH agent finds it in the guest (Apple's
/// path), and so the value of `SSH_AUTH_SOCK` there.
pub const SSH_AGENT_SOCKET: &str = "/var/host-services/ssh-auth.sock";
/// The line the agent prints just before it starts the image's init: everything before it in
/// the console is the boot log.
pub const INIT_MARKER: &str = "container-agent: starting init";
