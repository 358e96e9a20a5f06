//! The agent daemon: it tells the host it listens ([`report_ready`]), then serves one thread
//! per vsock connection: the versioned hello, then one request per session: exec
//! ([`crate::exec`]), copy in/out ([`crate::copy`]), the listening ports and forwarded
//! connections ([`crate::ports`]), shutdown, set time, ping. A session's
//! failure is logged and ends that session only.
//!
//! The server dispatches to the handlers and never the reverse: they answer through
//! [`crate::wire`], which depends on none of them.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use container_agent_proto::sync::{read, send};
use container_agent_proto::{BootConfig, Frame, Message, VERSION};
use vsock::{VMADDR_CID_ANY, VsockListener, VsockStream};

use crate::console::log;
use crate::wire::{Writer, error, reply};
use crate::{copy, exec, ports, sys};

/// Serves forever.
pub fn serve(cfg: &BootConfig) -> ! {
    let started = Instant::now();
    let listener = loop {
        match VsockListener::bind_with_cid_port(VMADDR_CID_ANY, cfg.vsock_port) {
            Ok(l) => break l,
            Err(e) => {
                log!(
                    "cannot listen on vsock port {}: {e}; retrying",
                    cfg.vsock_port
                );
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    };
    let ready_port = cfg.ready_port;
    std::thread::spawn(move || report_ready(ready_port));
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                std::thread::spawn(move || {
                    if let Err(e) = session(stream, started) {
                        log!("session failed: {e:#}");
                    }
                });
            }
            Err(e) => {
                log!("accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Tells the host the agent listens: one [`Message::Ready`] on a connection to the host's
/// `port`, repeated until the host acknowledges it. The host opens no session before it (see
/// the message's documentation), so a report that is lost leaves the machine unusable: the
/// host's side may still be coming up, or the service that took the report may have been
/// killed before it recorded it, and the next service listens again once it starts. A host
/// connection refused or cut is cheap for vhost-device-vsock (only the host's own early
/// connections break it), so the report is repeated for as long as a boot may take.
fn report_ready(port: u32) {
    let ready = || Message::Ready {
        version: VERSION,
        agent: env!("CARGO_PKG_VERSION").into(),
    };
    let attempt = || -> std::io::Result<()> {
        let mut s = VsockStream::connect_with_cid_port(vsock::VMADDR_CID_HOST, port)?;
        send(&mut s, ready())?;
        s.set_read_timeout(Some(ACK_LIMIT))?;
        match read(&mut s) {
            Ok(Some(Frame::Message(Message::Done))) => Ok(()),
            Ok(other) => Err(std::io::Error::other(format!(
                "the host did not acknowledge the report: {other:?}"
            ))),
            Err(e) => Err(std::io::Error::other(e)),
        }
    };
    if let Err(e) = repeat_until_acknowledged(attempt, std::thread::sleep) {
        log!("cannot tell the host the agent is ready (vsock port {port}): {e}");
    }
}

/// Runs `attempt` until it succeeds: every 200 ms at first, while the host's side comes up,
/// then every second until [`REPORT_FOR`] has passed (counted in the pauses taken); the
/// last error otherwise.
fn repeat_until_acknowledged(
    mut attempt: impl FnMut() -> std::io::Result<()>,
    mut pause: impl FnMut(Duration),
) -> std::io::Result<()> {
    let mut waited = Duration::ZERO;
    loop {
        let err = match attempt() {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if waited >= REPORT_FOR {
            return Err(err);
        }
        let step = match waited < Duration::from_secs(10) {
            true => Duration::from_millis(200),
            false => Duration::from_secs(1),
        };
        pause(step);
        waited += step;
    }
}

/// How long the agent repeats an unacknowledged readiness report: longer than the host's
/// boot timeout (180 s), so a service restarted at any point of a boot still hears it.
const REPORT_FOR: Duration = Duration::from_secs(600);
/// How long the host may take to acknowledge a report it received (it records it first).
const ACK_LIMIT: Duration = Duration::from_secs(5);

/// Serves one session: the hello, then one request. A request that fails is answered to the
/// host as an `Error` message; an error returned here is one that left the host without its
/// answer (the stream broke, the host spoke out of turn, the process could not be awaited).
fn session(stream: VsockStream, started: Instant) -> Result<()> {
    let mut reader = stream
        .try_clone()
        .context("duplicating the session's stream")?;
    let writer: Writer = Arc::new(Mutex::new(stream));
    match read(&mut reader).context("reading the hello")? {
        Some(Frame::Message(Message::Hello { version })) if version == VERSION => {
            reply(
                &writer,
                Message::HelloOk {
                    version: VERSION,
                    agent: env!("CARGO_PKG_VERSION").into(),
                    half_close: true,
                },
            )
            .context("answering the hello")?;
        }
        Some(Frame::Message(Message::Hello { version })) => {
            let _ = reply(
                &writer,
                error(
                    anyhow!(
                        "the agent speaks protocol version {VERSION}, the service {version}: restart the machine to update its agent"
                    ),
                    None,
                ),
            );
            return Ok(());
        }
        other => bail!("session opened without hello: {other:?}"),
    }
    let request = match read(&mut reader).context("reading the request")? {
        Some(Frame::Message(m)) => m,
        None => return Ok(()),
        Some(other) => bail!("session without a request: {other:?}"),
    };
    match request {
        Message::Ping => reply(
            &writer,
            Message::Pong {
                uptime_ms: started.elapsed().as_millis() as u64,
                init_pid: 1,
                init_running: init_running(),
                booted: init_running() && booted(),
            },
        )?,
        Message::SetTime { unix_ns } => {
            match sys::set_clock(unix_ns).context("setting the clock") {
                Ok(()) => reply(&writer, Message::Done)?,
                Err(e) => reply(&writer, error(e, None))?,
            }
        }
        Message::Stats => match std::fs::read_to_string("/proc/meminfo")
            .context("reading /proc/meminfo")
            .and_then(|t| {
                container_agent_proto::GuestMemory::from_meminfo(&t)
                    .context("/proc/meminfo has no MemTotal")
            }) {
            Ok(memory) => reply(&writer, Message::StatsReport(memory))?,
            Err(e) => reply(&writer, error(e, None))?,
        },
        Message::Reclaim => match reclaim() {
            Ok(()) => reply(&writer, Message::Done)?,
            Err(e) => reply(&writer, error(e, None))?,
        },
        Message::Shutdown { signal, timeout_ms } => shutdown(signal, timeout_ms, &writer)?,
        Message::Freeze { timeout_ms } => freeze(timeout_ms, reader, &writer)?,
        Message::Exec(req) => exec::run(req, reader, writer)?,
        Message::CopyIn { path } => copy::copy_in(&path, reader, &writer)?,
        Message::CopyOut { path } => copy::copy_out(&path, &writer)?,
        Message::WatchPorts => ports::watch(&reader, &writer)?,
        Message::Forward { port } => ports::forward(port, reader, &writer)?,
        Message::ForwardStream { port } => ports::forward_stream(port, reader, &writer)?,
        Message::ForwardUdp { port } => ports::forward_udp(port, reader, &writer)?,
        Message::CopyRoot => copy::copy_root(&writer)?,
        other => reply(&writer, error(anyhow!("not a request: {other:?}"), None))?,
    }
    Ok(())
}

/// The longest the guest stays frozen, whatever the host asked: writers in the guest block
/// meanwhile.
const FREEZE_LIMIT: Duration = Duration::from_secs(30);

/// Freezes `/` for the host's point-in-time copy of the disk, then thaws at `Thaw`, at the
/// end of the session or after the timeout.
fn freeze(timeout_ms: u64, mut reader: VsockStream, writer: &Writer) -> std::io::Result<()> {
    let root = match std::fs::File::open("/") {
        Ok(f) => f,
        Err(e) => return reply(writer, error(anyhow!(e).context("opening /"), None)),
    };
    if let Err(e) = sys::freeze(&root) {
        return reply(writer, error(anyhow!(e).context("freezing /"), None));
    }
    log!("filesystem frozen for a copy of the disk");
    let limit = Duration::from_millis(timeout_ms).min(FREEZE_LIMIT);
    let answered = reply(writer, Message::Done);
    if answered.is_ok() {
        let _ = reader.set_read_timeout(Some(limit));
        // Thaw, the session's end and the timeout all end the freeze.
        let _ = read(&mut reader);
    }
    let thawed = sys::thaw(&root);
    log!("filesystem thawed");
    answered?;
    match thawed {
        Ok(()) => reply(writer, Message::Done),
        Err(e) => reply(writer, error(anyhow!(e).context("thawing /"), None)),
    }
}

/// Drops the clean page cache (not dentries and inodes: a `git status` after an idle spell
/// would walk the disk again) and compacts free memory into the large blocks free-page
/// reporting hands back to the host (it reports only whole 2 MiB blocks on x86).
fn reclaim() -> Result<()> {
    std::fs::write("/proc/sys/vm/drop_caches", "1").context("dropping the page cache")?;
    // Compaction is best effort: a kernel without it still gave the cache back.
    let _ = std::fs::write("/proc/sys/vm/compact_memory", "1");
    Ok(())
}

/// PID 1 is the image's init once it no longer runs the agent's binary.
fn init_running() -> bool {
    match (
        std::fs::read_link("/proc/1/exe"),
        std::fs::read_link("/proc/self/exe"),
    ) {
        (Ok(init), Ok(me)) => init != me,
        _ => false,
    }
}

/// Whether the image's init has finished booting: systemd once `is-system-running` says
/// `running` or `degraded` (what `--wait` waits for), OpenRC once its default runlevel is
/// reached and nothing is still starting, any other init (busybox, sysvinit) at once.
fn booted() -> bool {
    let init = std::fs::canonicalize("/proc/1/exe").unwrap_or_default();
    if init.to_string_lossy().contains("systemd") {
        let state = std::process::Command::new("systemctl")
            .arg("is-system-running")
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        return systemd_booted(&state);
    }
    // An OpenRC system (openrc-init, or busybox init running OpenRC) has `openrc`; its state
    // directory appears only once its sysinit runlevel runs.
    let has_openrc = [
        "/sbin/openrc",
        "/usr/sbin/openrc",
        "/bin/openrc",
        "/usr/bin/openrc",
    ]
    .iter()
    .any(|p| std::path::Path::new(p).exists());
    if has_openrc {
        let openrc = std::path::Path::new("/run/openrc");
        let level = std::fs::read_to_string(openrc.join("softlevel")).unwrap_or_default();
        let starting = std::fs::read_dir(openrc.join("starting"))
            .map(|mut d| d.next().is_some())
            .unwrap_or(false);
        return openrc_booted(&level, starting);
    }
    true
}

/// systemd's `is-system-running` answer once boot is over, well or not.
fn systemd_booted(state: &str) -> bool {
    matches!(state, "running" | "degraded")
}

/// OpenRC has booted once its soft level is the default runlevel and no service is starting.
fn openrc_booted(softlevel: &str, starting: bool) -> bool {
    softlevel.trim() == "default" && !starting
}

/// Asks init to power the machine off, and forces it after the timeout.
fn shutdown(signal: Option<i32>, timeout_ms: u64, writer: &Writer) -> std::io::Result<()> {
    let init = std::fs::canonicalize("/proc/1/exe").unwrap_or_default();
    let sig = stop_signal(&init.to_string_lossy(), signal);
    log!("stopping: signal {sig} to init, power off forced after {timeout_ms} ms");
    let deadline = std::time::Instant::now() + Duration::from_millis(timeout_ms);
    reply(writer, Message::Done)?;
    let ready_by = deadline.min(std::time::Instant::now() + READY_LIMIT);
    if !wait_until_init_takes(sig, ready_by) {
        log!("init shows no handler for signal {sig}; sending it anyway");
    }
    if let Err(e) = sys::kill_raw(1, sig) {
        log!("signalling init failed: {e}");
    }
    std::thread::sleep(deadline.saturating_duration_since(std::time::Instant::now()));
    log!("init did not stop the machine in time; powering off");
    sys::power_off();
    Ok(())
}

/// How long a stop waits at most for init to be ready for its signal.
const READY_LIMIT: Duration = Duration::from_secs(10);

/// Waits until init takes `sig`, at most until `deadline`; true if it does. The kernel
/// drops a signal sent to PID 1 that neither has a handler for it nor blocks it, and systemd
/// sets up its signalfd seconds into boot: a stop right after start would otherwise be lost
/// and end, after the whole timeout, in a forced power-off. Inits that wait in
/// sigtimedwait (busybox) show their signals neither caught nor blocked while they wait (the
/// kernel lifts the block for the call), so sleeping there counts as ready too.
fn wait_until_init_takes(sig: i32, deadline: std::time::Instant) -> bool {
    loop {
        let status = std::fs::read_to_string("/proc/1/status").unwrap_or_default();
        let wchan = std::fs::read_to_string("/proc/1/wchan").unwrap_or_default();
        if catches(&status, sig) || wchan.contains("sigtimedwait") {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether a `/proc/PID/status` text says the process catches or blocks `sig` (`SigCgt`,
/// `SigBlk`): either way the kernel keeps the signal for it.
fn catches(status: &str, sig: i32) -> bool {
    let mask = |field: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
            .unwrap_or(0)
    };
    let taken = mask("SigCgt:") | mask("SigBlk:");
    (1..=64).contains(&sig) && taken & (1u64 << (sig - 1)) != 0
}

/// The signal that stops an init cleanly: the caller's, else by kind. systemd's SIGRTMIN+3
/// (halt, what container images declare as their stop signal) becomes SIGRTMIN+4 (power
/// off): a halted VM would sit until the timeout.
fn stop_signal(init: &str, requested: Option<i32>) -> i32 {
    let name = init.rsplit('/').next().unwrap_or_default();
    let systemd = name.contains("systemd");
    // openrc-init (0.45, Debian 12's, to its current source) halts on TERM and PWR
    // (reboot(RB_HALT_SYSTEM), after killing every process, this agent included, so nothing
    // forces the VM off before the host's own timeout) and powers off only through its
    // control FIFO. INT runs the same shutdown and reboots, which QEMU's -no-reboot turns
    // into an exit: a clean stop.
    let openrc = name == "openrc-init";
    let rtmin = libc::SIGRTMIN();
    match requested {
        Some(s) if systemd && s == rtmin + 3 => rtmin + 4,
        Some(s) if openrc && (s == libc::SIGTERM || s == libc::SIGPWR) => libc::SIGINT,
        Some(s) => s,
        None if systemd => rtmin + 4,
        // busybox init: USR1 halts, USR2 powers off, TERM reboots.
        None if name == "busybox" => libc::SIGUSR2,
        None if openrc => libc::SIGINT,
        // sysvinit and others.
        None => libc::SIGTERM,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_readiness_report_is_repeated_until_acknowledged_then_given_up() {
        // Refused twice (the service was down), then acknowledged.
        let mut calls = 0;
        let mut paused = Vec::new();
        let acknowledged = repeat_until_acknowledged(
            || {
                calls += 1;
                match calls {
                    3 => Ok(()),
                    _ => Err(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
                }
            },
            |d| paused.push(d),
        );
        assert!(acknowledged.is_ok());
        assert_eq!(paused, [Duration::from_millis(200); 2]);

        // Never acknowledged: repeated for the whole window, a second apart once the host
        // has had 10 s to come up, then given up with the last error.
        let mut calls = 0;
        let mut waited = Duration::ZERO;
        let err = repeat_until_acknowledged(
            || {
                calls += 1;
                Err(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
            },
            |d| waited += d,
        )
        .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
        assert!(waited >= REPORT_FOR && waited < REPORT_FOR + Duration::from_secs(1));
        assert_eq!(calls, 50 + (REPORT_FOR.as_secs() as u32 - 10) + 1);
    }

    #[test]
    fn boot_is_over_when_the_init_says_so() {
        assert!(systemd_booted("running"));
        assert!(systemd_booted("degraded"));
        for not_yet in ["initializing", "starting", "", "offline"] {
            assert!(!systemd_booted(not_yet), "{not_yet}");
        }
        assert!(openrc_booted("default\n", false));
        assert!(
            !openrc_booted("default", true),
            "a service is still starting"
        );
        assert!(!openrc_booted("sysinit", false));
        assert!(!openrc_booted("", false));
    }

    #[test]
    fn caught_signals_are_read_from_the_status_mask() {
        // SIGUSR2 (12) and SIGRTMIN+4 (38 on Linux) caught; SIGWINCH (28) not.
        let status = "Name:\tinit\nSigIgn:\t0000000000000000\nSigCgt:\t0000002000000800\n";
        assert!(catches(status, libc::SIGUSR2));
        assert!(catches(status, 38));
        assert!(!catches(status, libc::SIGWINCH));
        // Blocked, to be read with signalfd: kept too.
        let blocked = "SigBlk:\t0000000000000800\nSigCgt:\t0000000000000000\n";
        assert!(catches(blocked, libc::SIGUSR2));
        assert!(!catches(blocked, libc::SIGTERM));
        assert!(!catches("garbage", libc::SIGUSR2));
        assert!(!catches(status, 0));
    }

    #[test]
    fn each_init_gets_its_power_off_signal() {
        let rtmin = libc::SIGRTMIN();
        assert_eq!(stop_signal("/usr/lib/systemd/systemd", None), rtmin + 4);
        assert_eq!(
            stop_signal("/usr/lib/systemd/systemd", Some(rtmin + 3)),
            rtmin + 4
        );
        assert_eq!(stop_signal("/bin/busybox", None), libc::SIGUSR2);
        assert_eq!(stop_signal("/sbin/openrc-init", None), libc::SIGINT);
        // openrc-init's halt signals would leave a halted VM: they become its reboot one.
        for halt in [libc::SIGTERM, libc::SIGPWR] {
            assert_eq!(
                stop_signal("/usr/sbin/openrc-init", Some(halt)),
                libc::SIGINT
            );
        }
        assert_eq!(
            stop_signal("/usr/sbin/openrc-init", Some(libc::SIGUSR1)),
            libc::SIGUSR1
        );
        assert_eq!(stop_signal("/sbin/init", None), libc::SIGTERM);
        assert_eq!(
            stop_signal("/bin/busybox", Some(libc::SIGTERM)),
            libc::SIGTERM
        );
    }
}
