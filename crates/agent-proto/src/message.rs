//! The control messages of a session, carried as JSON in [`crate::Kind::Message`] frames.
//! Unknown fields are refused: a message either means exactly one thing or is an error.

use serde::{Deserialize, Serialize};

/// Control messages, both directions (the crate docs list who sends what).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Message {
    /// Host, first frame of every session.
    Hello { version: u32 },
    /// Agent, accepting the session.
    HelloOk { version: u32, agent: String },
    /// Host: start a process.
    Exec(ExecRequest),
    /// Agent: the process runs.
    Started { pid: i32 },
    /// Host: no more input. On a tty the agent types the EOF character (^D) instead of
    /// closing the terminal.
    StdinEof,
    /// Host: the terminal's new size (tty sessions).
    Resize { rows: u16, cols: u16 },
    /// Host: deliver a signal to the process's whole session.
    Signal { signal: i32 },
    /// Agent: the process ended, with an exit code or by a signal.
    Exit {
        code: Option<i32>,
        signal: Option<i32>,
    },
    /// Host: unpack the tar stream that follows (`Data` frames, then `DataEof`) at `path`:
    /// into it when it is a directory, else as it (the archive's top entry renamed).
    /// Ownership and modes in the archive are kept.
    CopyIn { path: String },
    /// Host: send a tar stream of `path`, its base name at the top, ownership kept.
    CopyOut { path: String },
    /// End of a tar stream, either direction.
    DataEof,
    /// Agent: the request succeeded.
    Done,
    /// Host: stop the machine through its init: `signal` to PID 1 (or the init's own clean
    /// power-off signal when `None`), then a forced power-off after `timeout_ms`.
    Shutdown {
        signal: Option<i32>,
        timeout_ms: u64,
    },
    /// Host: set the guest's real-time clock.
    SetTime { unix_ns: u64 },
    /// Agent, alone on the connection it opens to the host's [`crate::READY_PORT`] once it
    /// listens: the machine's agent is up. The host connects to the agent only after this:
    /// vhost-device-vsock's worker dies when a host connection reaches it while the guest is
    /// still setting up the device's queues, and the agent's readiness is the first moment
    /// the host knows they are set up.
    Ready { version: u32, agent: String },
    /// Host: readiness probe.
    Ping,
    /// Agent: alive for `uptime_ms`; `init_running` once PID 1 is the image's init;
    /// `booted` once that init has finished booting (systemd running or degraded, OpenRC's
    /// default runlevel reached, any other init at once).
    Pong {
        uptime_ms: u64,
        init_pid: i32,
        #[serde(default)]
        init_running: bool,
        /// Absent from an agent that predates it: such a machine counts as booted.
        #[serde(default = "crate::message::booted_unknown")]
        booted: bool,
    },
    /// Agent: the request failed. For `Exec`, `code` follows the shell convention (126 not
    /// executable or bad working directory or user, 127 not found).
    Error { message: String, code: Option<i32> },
}

/// A process to start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// The program (looked up in the `PATH` of `env` when it has no slash) and its arguments.
    pub argv: Vec<String>,
    /// What the program sees as its `argv[0]`, e.g. `-bash` for a login shell.
    pub arg0: Option<String>,
    /// `KEY=VALUE` entries, the process's whole environment.
    pub env: Vec<String>,
    /// The working directory; it must exist.
    pub cwd: String,
    /// A numeric user. Its primary group and supplementary groups come from the guest's
    /// /etc/passwd and /etc/group when the uid has an entry there.
    pub uid: Option<u32>,
    /// Overrides the primary group.
    pub gid: Option<u32>,
    /// When present, exactly the supplementary groups (besides the primary one), instead of
    /// those the guest's /etc/group gives the user: `run --root --gid 1000` runs as uid 0,
    /// gid 0, groups `0 1000`. Absent from the JSON when `None`, so an older agent still
    /// parses every request that does not use it; an older host never sends it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<Vec<u32>>,
    /// A user name resolved in the guest's /etc/passwd (wins over `uid`).
    pub user: Option<String>,
    /// A pseudo-terminal (the process leads a session with it as controlling terminal, and
    /// stdout carries everything it writes) instead of three pipes.
    pub tty: bool,
    /// Initial terminal size.
    pub rows: u16,
    pub cols: u16,
}

/// What an agent that does not report `booted` is taken to say: booted (it is running).
pub(crate) fn booted_unknown() -> bool {
    true
}
