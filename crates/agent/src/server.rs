//! The agent daemon: one thread per vsock connection, one operation per session after the
//! versioned hello: exec, copy in/out, shutdown, set time, ping.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use container_agent_proto::sync::{read, send, write};
use container_agent_proto::{BootConfig, ExecRequest, Frame, Kind, Message, VERSION};
use vsock::{VMADDR_CID_ANY, VsockListener, VsockStream};

use crate::{log, sys};

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
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                std::thread::spawn(move || {
                    if let Err(e) = session(stream, started) {
                        log!("session failed: {e}");
                    }
                });
            }
            Err(e) => log!("accept failed: {e}"),
        }
    }
    // incoming() never ends; keep the type honest.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

type Shared = Arc<Mutex<VsockStream>>;

fn reply(w: &Shared, m: Message) -> std::io::Result<()> {
    send(&mut *w.lock().unwrap_or_else(|p| p.into_inner()), m)
}

fn error(message: impl Into<String>, code: Option<i32>) -> Message {
    Message::Error {
        message: message.into(),
        code,
    }
}

fn session(stream: VsockStream, started: Instant) -> Result<(), String> {
    let mut reader = stream.try_clone().map_err(|e| e.to_string())?;
    let writer: Shared = Arc::new(Mutex::new(stream));
    match read(&mut reader).map_err(|e| e.to_string())? {
        Some(Frame::Message(Message::Hello { version })) if version == VERSION => {
            reply(
                &writer,
                Message::HelloOk {
                    version: VERSION,
                    agent: env!("CARGO_PKG_VERSION").into(),
                },
            )
            .map_err(|e| e.to_string())?;
        }
        Some(Frame::Message(Message::Hello { version })) => {
            let _ = reply(
                &writer,
                error(format!("protocol version {version} is not {VERSION}"), None),
            );
            return Ok(());
        }
        _ => return Err("session without hello".into()),
    }
    let first = match read(&mut reader).map_err(|e| e.to_string())? {
        Some(Frame::Message(m)) => m,
        _ => return Err("session without a request".into()),
    };
    let r = match first {
        Message::Ping => reply(
            &writer,
            Message::Pong {
                uptime_ms: started.elapsed().as_millis() as u64,
                init_pid: 1,
            },
        ),
        Message::SetTime { unix_ns } => {
            let ts = nix::sys::time::TimeSpec::new(
                (unix_ns / 1_000_000_000) as i64,
                (unix_ns % 1_000_000_000) as i64,
            );
            match nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts) {
                Ok(()) => reply(&writer, Message::Done),
                Err(e) => reply(&writer, error(format!("setting the clock: {e}"), None)),
            }
        }
        Message::Shutdown { signal, timeout_ms } => {
            let sig = stop_signal(signal);
            log!("stopping: signal {sig} to init, forced off after {timeout_ms} ms");
            sys::kill_raw(1, sig);
            let _ = reply(&writer, Message::Done);
            std::thread::sleep(Duration::from_millis(timeout_ms));
            log!("init did not stop in time; powering off");
            sys::power_off();
            Ok(())
        }
        Message::Exec(req) => exec(req, reader, writer.clone()),
        Message::CopyIn { path } => copy_in(&path, reader, &writer),
        Message::CopyOut { path } => copy_out(&path, &writer),
        other => reply(
            &writer,
            error(format!("unexpected request {other:?}"), None),
        ),
    };
    r.map_err(|e| e.to_string())
}

/// The signal that stops this machine's init cleanly: the caller's, else by init kind.
/// systemd's SIGRTMIN+3 (halt, what container images declare) becomes SIGRTMIN+4 (power
/// off): a halted VM would sit until the timeout.
fn stop_signal(requested: Option<i32>) -> i32 {
    let target = std::fs::canonicalize("/sbin/init").unwrap_or_default();
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let systemd = name.contains("systemd");
    let rtmin = libc::SIGRTMIN();
    match requested {
        Some(s) if systemd && s == rtmin + 3 => rtmin + 4,
        Some(s) => s,
        None if systemd => rtmin + 4,
        None if name.contains("busybox") => libc::SIGUSR2,
        None => libc::SIGTERM,
    }
}

/// Looks a user up in the guest's /etc/passwd: (uid, gid, name).
fn lookup_user(by_name: Option<&str>, by_uid: Option<u32>) -> Option<(u32, u32, String)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 4 {
            return None;
        }
        let uid: u32 = f[2].parse().ok()?;
        let matches = by_name.is_some_and(|n| n == f[0]) || by_uid.is_some_and(|u| u == uid);
        matches.then(|| (uid, f[3].parse().unwrap_or(uid), f[0].to_string()))
    })
}

/// Supplementary groups of `name` from the guest's /etc/group, plus `gid`.
fn groups_of(name: &str, gid: u32) -> Vec<libc::gid_t> {
    let mut out = vec![gid];
    if let Ok(text) = std::fs::read_to_string("/etc/group") {
        for l in text.lines() {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() >= 4
                && f[3].split(',').any(|m| m == name)
                && let Ok(g) = f[2].parse()
                && !out.contains(&g)
            {
                out.push(g);
            }
        }
    }
    out
}

fn find_program(argv0: &str, env: &[String]) -> Option<String> {
    if argv0.contains('/') {
        return Some(argv0.to_string());
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    path.split(':').map(|d| format!("{d}/{argv0}")).find(|p| {
        std::fs::metadata(p).is_ok_and(|m| {
            m.is_file() && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0
        })
    })
}

fn exec(req: ExecRequest, mut reader: VsockStream, writer: Shared) -> std::io::Result<()> {
    let Some(argv0) = req.argv.first().cloned() else {
        return reply(&writer, error("no command given", Some(127)));
    };
    let (uid, gid, name) = match (&req.user, req.uid) {
        (Some(n), _) => match lookup_user(Some(n), None) {
            Some(u) => u,
            None => {
                return reply(
                    &writer,
                    error(
                        format!("unable to find user {n}: no matching entries in passwd file"),
                        Some(126),
                    ),
                );
            }
        },
        (None, Some(u)) => lookup_user(None, Some(u)).unwrap_or((u, u, String::new())),
        (None, None) => (0, 0, "root".into()),
    };
    let gid = req.gid.unwrap_or(gid);
    let groups = if name.is_empty() {
        vec![gid]
    } else {
        groups_of(&name, gid)
    };
    let Some(program) = find_program(&argv0, &req.env) else {
        return reply(
            &writer,
            error(
                format!("exec: \"{argv0}\": executable file not found in $PATH"),
                Some(127),
            ),
        );
    };
    if !std::path::Path::new(&req.cwd).is_dir() {
        return reply(
            &writer,
            error(
                format!("working directory {}: no such directory", req.cwd),
                Some(126),
            ),
        );
    }
    let mut cmd = Command::new(&program);
    cmd.args(&req.argv[1..]).env_clear().current_dir(&req.cwd);
    for e in &req.env {
        if let Some((k, v)) = e.split_once('=') {
            cmd.env(k, v);
        }
    }
    use std::os::unix::process::CommandExt;
    cmd.arg0(req.arg0.clone().unwrap_or(argv0.clone()));

    let pty = if req.tty {
        let p = nix::pty::openpty(None, None).map_err(std::io::Error::from)?;
        sys::set_winsize(p.master.as_raw_fd(), req.rows.max(1), req.cols.max(1));
        Some(p)
    } else {
        None
    };
    let slave_fd = pty.as_ref().map(|p| p.slave.as_raw_fd());
    match &pty {
        Some(p) => {
            cmd.stdin(Stdio::from(p.slave.try_clone()?))
                .stdout(Stdio::from(p.slave.try_clone()?))
                .stderr(Stdio::from(p.slave.try_clone()?));
        }
        None => {
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
        }
    }
    sys::pre_exec(&mut cmd, move || {
        if let Some(fd) = slave_fd {
            sys::set_controlling_tty(fd)?;
        } else {
            sys::new_session()?;
        }
        sys::set_groups(&groups)?;
        sys::set_ids(uid, gid)
    });
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            };
            return reply(
                &writer,
                error(format!("exec: \"{argv0}\": {e}"), Some(code)),
            );
        }
    };
    let pid = child.id() as i32;
    reply(&writer, Message::Started { pid })?;

    let mut outputs = Vec::new();
    let stdin_sink: Box<dyn Write + Send> = match &pty {
        Some(p) => {
            let master = p.master.try_clone()?;
            let w = writer.clone();
            let mut m = std::fs::File::from(master.try_clone()?);
            outputs.push(std::thread::spawn(move || pump(&mut m, Kind::Stdout, &w)));
            Box::new(std::fs::File::from(master))
        }
        None => {
            let mut out = child.stdout.take().expect("piped");
            let mut err = child.stderr.take().expect("piped");
            let (w1, w2) = (writer.clone(), writer.clone());
            outputs.push(std::thread::spawn(move || {
                pump(&mut out, Kind::Stdout, &w1)
            }));
            outputs.push(std::thread::spawn(move || {
                pump(&mut err, Kind::Stderr, &w2)
            }));
            Box::new(child.stdin.take().expect("piped"))
        }
    };
    let master_fd = pty.as_ref().map(|p| p.master.as_raw_fd());
    let is_tty = pty.is_some();
    // Input: stdin bytes, EOF, resizes and signals from the host.
    std::thread::spawn(move || {
        let mut sink = Some(stdin_sink);
        while let Ok(Some(frame)) = read(&mut reader) {
            match frame {
                Frame::Data(Kind::Stdin, bytes) => {
                    if let Some(s) = sink.as_mut()
                        && s.write_all(&bytes).is_err()
                    {
                        sink = None;
                    }
                }
                Frame::Message(Message::StdinEof) => {
                    if is_tty {
                        // End of input on a terminal is the EOF character, not a close.
                        if let Some(s) = sink.as_mut() {
                            let _ = s.write_all(&[4]);
                        }
                    } else {
                        sink = None;
                    }
                }
                Frame::Message(Message::Resize { rows, cols }) => {
                    if let Some(fd) = master_fd {
                        sys::set_winsize(fd, rows, cols);
                        sys::kill_raw(-pid, libc::SIGWINCH);
                    }
                }
                Frame::Message(Message::Signal { signal }) => {
                    // The whole session: the process and what it started.
                    sys::kill_raw(-pid, signal);
                }
                _ => {}
            }
        }
    });
    let status = child.wait()?;
    // Our copy of the slave must close so the master reads EOF once the process is gone.
    let pty_master = pty.map(|p| {
        drop(p.slave);
        p.master
    });
    for t in outputs {
        let _ = t.join();
    }
    drop(pty_master);
    use std::os::unix::process::ExitStatusExt;
    reply(
        &writer,
        Message::Exit {
            code: status.code(),
            signal: status.signal(),
        },
    )
}

/// Copies a process output into frames until EOF (or EIO from a closed pty).
fn pump(r: &mut dyn Read, kind: Kind, w: &Shared) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let mut s = w.lock().unwrap_or_else(|p| p.into_inner());
                if write(&mut *s, &Frame::Data(kind, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    }
}

/// Receives a tar stream and unpacks it at `path`.
fn copy_in(path: &str, mut reader: VsockStream, writer: &Shared) -> std::io::Result<()> {
    let (rx, tx) = nix::unistd::pipe().map_err(std::io::Error::from)?;
    let target = path.to_string();
    let unpacker = std::thread::spawn(move || unpack(&target, std::fs::File::from(rx)));
    let mut tx = Some(std::fs::File::from(tx));
    loop {
        match read(&mut reader) {
            Ok(Some(Frame::Data(Kind::Data, bytes))) => {
                if let Some(t) = tx.as_mut()
                    && t.write_all(&bytes).is_err()
                {
                    tx = None;
                }
            }
            Ok(Some(Frame::Message(Message::DataEof))) | Ok(None) => break,
            Ok(Some(_)) => {}
            Err(e) => return Err(std::io::Error::other(e.to_string())),
        }
    }
    drop(tx);
    match unpacker.join() {
        Ok(Ok(())) => reply(writer, Message::Done),
        Ok(Err(e)) => reply(writer, error(e, None)),
        Err(_) => reply(writer, error("the unpacker crashed", None)),
    }
}

fn unpack(path: &str, input: std::fs::File) -> Result<(), String> {
    let dest = std::path::Path::new(path);
    let (dir, rename) = if dest.is_dir() {
        (dest.to_path_buf(), None)
    } else {
        let parent = dest
            .parent()
            .unwrap_or(std::path::Path::new("/"))
            .to_path_buf();
        if !parent.is_dir() {
            return Err(format!(
                "{} does not exist in the machine",
                parent.display()
            ));
        }
        (parent, dest.file_name().map(std::path::PathBuf::from))
    };
    let mut archive = tar::Archive::new(input);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_overwrite(true);
    for entry in archive.entries().map_err(|e| e.to_string())? {
        let mut entry = entry.map_err(|e| e.to_string())?;
        let p = entry.path().map_err(|e| e.to_string())?.into_owned();
        let relative = match &rename {
            Some(top) => {
                let mut parts = p.components();
                parts.next();
                top.join(parts.as_path())
            }
            None => p,
        };
        let target = dir.join(&relative);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
        }
        entry
            .unpack(&target)
            .map_err(|e| format!("writing {}: {e}", target.display()))?;
    }
    Ok(())
}

/// Writes data frames.
struct FrameWriter<'a>(&'a Shared);

impl Write for FrameWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(256 * 1024);
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        write(&mut *s, &Frame::Data(Kind::Data, buf[..n].to_vec()))?;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Streams a tar of `path`.
fn copy_out(path: &str, writer: &Shared) -> std::io::Result<()> {
    let src = std::path::Path::new(path);
    let meta = match std::fs::symlink_metadata(src) {
        Ok(m) => m,
        Err(e) => return reply(writer, error(format!("{path}: {e}"), None)),
    };
    let name = src
        .file_name()
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "root".into());
    let mut builder = tar::Builder::new(FrameWriter(writer));
    builder.follow_symlinks(false);
    let r = if meta.is_dir() {
        builder.append_dir_all(&name, src)
    } else {
        builder.append_path_with_name(src, &name)
    };
    let r = r.and_then(|()| builder.finish());
    drop(builder);
    match r {
        Ok(()) => reply(writer, Message::DataEof),
        Err(e) => reply(writer, error(format!("reading {path}: {e}"), None)),
    }
}
