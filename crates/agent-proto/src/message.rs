//! The control messages of a session, carried as JSON in [`crate::Kind::Message`] frames.
//! Unknown fields are refused: a message either means exactly one thing or is an error.

use serde::{Deserialize, Serialize};

/// Control messages, both directions (the crate docs list who sends what).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Message {
    /// Host, first frame of every session.
    Hello { version: u32 },
    /// Agent, accepting the session. `half_close`: it serves [`Message::ForwardStream`]
    /// (left out when false, so agents from before it read the same).
    HelloOk {
        version: u32,
        agent: String,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        half_close: bool,
    },
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
    /// Host: send a tar stream of the machine's root filesystem for `machine commit`: that
    /// filesystem only (no other mount's contents: not /proc, /sys, /dev, nor shares), and
    /// without the contents of /run, /tmp and the agent's host services; names relative to
    /// `/`, hard links kept, sockets left out.
    CopyRoot,
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
    /// Host: freeze the machine disk's filesystem (FIFREEZE on `/`), so the disk is
    /// consistent for a point-in-time copy. The agent answers `Done` once frozen, then thaws
    /// at the host's `Thaw`, when the session closes, or after `timeout_ms`, whichever comes
    /// first (a host that vanished never leaves the guest frozen), and answers `Done` again.
    Freeze { timeout_ms: u64 },
    /// Host: thaw what `Freeze` froze.
    Thaw,
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
    /// Host: what the guest's memory holds now.
    Stats,
    /// Agent: the guest's memory, from its `/proc/meminfo`.
    StatsReport(GuestMemory),
    /// Host: give the guest's clean page cache back (the host is short of memory, or the
    /// machine has been idle): the agent drops it and compacts the free memory, which
    /// free-page reporting then returns to the host. `Done` once that is through.
    Reclaim,
    /// Host: keep me told of the guest's listening TCP ports (IPv4 and IPv6, those on a
    /// wildcard or loopback address: what a forward to the guest's loopback reaches) and of
    /// the UDP ports a server is bound to (the agent's doc says which count). The agent
    /// answers one `Ports` with the whole set at once, then another whenever the set
    /// changes (it looks every second), until the host closes the session.
    WatchPorts,
    /// Agent: the guest's listening TCP ports (`ports`) and served UDP ports (`udp`) now,
    /// each sorted, each port once. `udp` is left out when empty and read as empty when
    /// absent, so this message reads the same to and from a peer that predates UDP: an
    /// older agent reports no UDP port, and so is never asked for a `ForwardUdp` it does not
    /// know (which is why the protocol version did not change).
    Ports {
        ports: Vec<u16>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        udp: Vec<u16>,
    },
    /// Host: connect to TCP `port` on the guest's loopback (127.0.0.1, else ::1). The agent
    /// answers `Done` once connected, then the session carries that connection's raw bytes
    /// both ways (no frames); or `Error` when nothing listens there.
    Forward { port: u16 },
    /// Host: as `Forward`, but after `Done` the host's bytes come in `Data` frames and
    /// their end as one `DataEof`, on which the agent shuts down only the sending side of the
    /// guest connection: a client that half-closes after its request still gets the reply.
    /// The guest's bytes come back raw, as for `Forward`. Asked only of an agent whose
    /// `HelloOk` says `half_close` (vhost-device-vsock carries no half-close of its own).
    ForwardStream { port: u16 },
    /// Host: relay one host client's datagrams to UDP `port` on the guest's loopback. The
    /// agent opens a UDP socket of the session's own (so the guest's server sees one peer
    /// per host client, and its replies come back to this session only), answers `Done`,
    /// then each `Data` frame either way is one datagram, whole (a UDP payload is at most
    /// 65,507 bytes, far below [`crate::MAX_FRAME`]); no other frame follows. The host
    /// ends the session by closing it.
    ForwardUdp { port: u16 },
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
    /// Forward the host's SSH agent while the process runs: the agent listens on
    /// [`crate::SSH_AGENT_SOCKET`] (owned by the process's user, mode 0600) and relays each
    /// connection to the host's [`crate::SSH_AGENT_PORT`]. Absent from the JSON when false,
    /// so an older agent still parses every request that does not use it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ssh_agent: bool,
}

/// The guest's memory as its kernel counts it (`/proc/meminfo`), in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct GuestMemory {
    /// `MemTotal`: what the guest's kernel manages.
    pub total: u64,
    /// `MemFree`: not used for anything.
    pub free: u64,
    /// `MemAvailable`: what could be given to programs without swapping.
    pub available: u64,
    /// `Buffers` + `Cached` + `SReclaimable`: caches the guest could drop.
    pub cache: u64,
    /// What programs and the kernel hold: total - free - cache.
    pub used: u64,
}

impl GuestMemory {
    /// Reads the figures out of the text of `/proc/meminfo`; `None` without `MemTotal`.
    pub fn from_meminfo(text: &str) -> Option<GuestMemory> {
        let mut field = std::collections::HashMap::new();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            let (Some(key), Some(value)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(value) = value.parse::<u64>() else {
                continue;
            };
            let bytes = match words.next() {
                Some("kB") => value.saturating_mul(1024),
                _ => value,
            };
            field.insert(key.trim_end_matches(':'), bytes);
        }
        let get = |k: &str| field.get(k).copied().unwrap_or(0);
        let total = *field.get("MemTotal")?;
        let free = get("MemFree");
        let cache = get("Buffers") + get("Cached") + get("SReclaimable");
        Some(GuestMemory {
            total,
            free,
            available: field.get("MemAvailable").copied().unwrap_or(free + cache),
            cache,
            used: total.saturating_sub(free).saturating_sub(cache),
        })
    }
}

/// What an agent that does not report `booted` is taken to say: booted (it is running).
pub(crate) fn booted_unknown() -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_is_read_in_bytes_with_caches_apart() {
        let text = "MemTotal:        1000 kB\nMemFree:          200 kB\nMemAvailable:     700 kB\n\
                    Buffers:           10 kB\nCached:           300 kB\nSwapCached:        0 kB\n\
                    SReclaimable:      40 kB\nHugePages_Total:   0\n";
        let m = GuestMemory::from_meminfo(text).unwrap();
        assert_eq!(m.total, 1_024_000);
        assert_eq!(m.free, 204_800);
        assert_eq!(m.available, 716_800);
        assert_eq!(m.cache, 350 * 1024);
        assert_eq!(m.used, (1000 - 200 - 350) * 1024);
        assert_eq!(GuestMemory::from_meminfo("garbage\n"), None);
    }
}
