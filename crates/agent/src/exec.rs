//! Exec sessions: resolve the user, program and directory (failing like docker: 127 not
//! found, 126 not runnable), start the process in a session of its own with a pty or pipes,
//! relay input, resizes and signals from the host and output to it, and end with its exit;
//! a session that asks for it holds the forwarded SSH agent ([`crate::ssh_agent`]) meanwhile.
//! Every descriptor the agent opens is close-on-exec, so no session leaks into another's
//! process (a leaked pty end would keep that session from ever ending).

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result};
use container_agent_proto::sync::read;
use container_agent_proto::{ExecRequest, Frame, Kind, Message};
use rustix::fs::{Mode, OFlags};
use rustix::pty::OpenptFlags;
use vsock::VsockStream;

use crate::console::log;
use crate::wire::{self, Writer, error, reply};
use crate::{ssh_agent, sys};

/// The PATH when the request's environment has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How long output may keep coming after the process exits (from children it left
/// holding its output open) before the exit is reported anyway.
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(500);
/// Stdin chunks queued for a process that does not read.
const STDIN_QUEUE: usize = 16;

/// Who the process runs as.
#[derive(Debug, Clone, PartialEq)]
struct Identity {
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
}

/// Why a process cannot start, answered as docker does: the exit code tells the kind.
#[derive(Debug, PartialEq)]
enum Refusal {
    /// Exit code 127: no such program, or no command at all.
    NotFound(String),
    /// Exit code 126: the program, user or directory is there but cannot be used.
    CannotRun(String),
}

impl Refusal {
    /// The exit code the host reports for it.
    fn code(&self) -> i32 {
        match self {
            Refusal::NotFound(_) => 127,
            Refusal::CannotRun(_) => 126,
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::NotFound(m) | Refusal::CannotRun(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Refusal {}

/// Resolves the user against the guest's /etc/passwd and /etc/group.
fn identity(req: &ExecRequest, passwd: &str, group: &str) -> Result<Identity, Refusal> {
    let entry = |pred: &dyn Fn(&str, u32) -> bool| {
        passwd.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            let uid: u32 = f.get(2)?.parse().ok()?;
            let gid: u32 = f.get(3)?.parse().ok()?;
            pred(f[0], uid).then(|| (f[0].to_string(), uid, gid))
        })
    };
    let (name, uid, gid) = match (&req.user, req.uid) {
        (Some(n), _) => entry(&|name, _| name == n).ok_or_else(|| {
            Refusal::CannotRun(format!(
                "unable to find user {n}: no matching entries in passwd file"
            ))
        })?,
        (None, Some(u)) => entry(&|_, uid| uid == u).unwrap_or((String::new(), u, u)),
        (None, None) => ("root".to_string(), 0, 0),
    };
    let gid = req.gid.unwrap_or(gid);
    let mut groups = vec![gid];
    if let Some(extra) = &req.groups {
        for g in extra {
            if !groups.contains(g) {
                groups.push(*g);
            }
        }
    } else if !name.is_empty() {
        for l in group.lines() {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() >= 4
                && f[3].split(',').any(|m| m == name)
                && let Ok(g) = f[2].parse()
                && !groups.contains(&g)
            {
                groups.push(g);
            }
        }
    }
    Ok(Identity { uid, gid, groups })
}

/// Finds the program like execvp, reporting failures as docker does.
fn find_program(argv0: &str, env: &[String]) -> Result<String, Refusal> {
    let runnable = |p: &Path| -> Result<(), Refusal> {
        match std::fs::metadata(p) {
            Ok(m) if m.is_dir() => Err(Refusal::CannotRun(format!(
                "exec: \"{argv0}\": is a directory"
            ))),
            Ok(m) if m.permissions().mode() & 0o111 == 0 => Err(Refusal::CannotRun(format!(
                "exec: \"{argv0}\": permission denied"
            ))),
            Ok(_) => Ok(()),
            Err(_) => Err(Refusal::NotFound(format!(
                "exec: \"{argv0}\": no such file or directory"
            ))),
        }
    };
    if argv0.contains('/') {
        return runnable(Path::new(argv0)).map(|()| argv0.to_string());
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    let mut refusal = None;
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let candidate = format!("{dir}/{argv0}");
        match runnable(Path::new(&candidate)) {
            Ok(()) => return Ok(candidate),
            // A program found but unusable is the answer unless a later directory has one
            // that runs, as with execvp.
            Err(r @ Refusal::CannotRun(_)) => refusal = refusal.or(Some(r)),
            Err(Refusal::NotFound(_)) => {}
        }
    }
    Err(refusal.unwrap_or_else(|| {
        Refusal::NotFound(format!(
            "exec: \"{argv0}\": executable file not found in $PATH"
        ))
    }))
}

/// Checks everything that can be checked before starting the process.
fn prepare(req: &ExecRequest) -> Result<(Identity, String), Refusal> {
    let Some(argv0) = req.argv.first() else {
        return Err(Refusal::NotFound("no command given".to_string()));
    };
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    let who = identity(req, &passwd, &group)?;
    if !Path::new(&req.cwd).is_dir() {
        return Err(Refusal::CannotRun(format!(
            "cannot enter the working directory {:?}: no such directory in the machine",
            req.cwd
        )));
    }
    let program = match find_program(argv0, &req.env) {
        Err(refusal) if is_login_shell(req) => {
            login_shell_fallback(&passwd, who.uid).ok_or(refusal)?
        }
        found => found?,
    };
    Ok((who, program))
}

/// A login shell is asked for as the host user's shell with `-name` as `argv[0]`.
fn is_login_shell(req: &ExecRequest) -> bool {
    req.argv.len() == 1 && req.arg0.as_deref().is_some_and(|a| a.starts_with('-'))
}

/// The shell to log in with when the host user's shell is not in the image (zsh on the host,
/// busybox in the machine): the user's shell in the image's passwd, else `/bin/sh`.
fn login_shell_fallback(passwd: &str, uid: u32) -> Option<String> {
    let own = passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 7 && f[2].parse() == Ok(uid)).then(|| f[6].to_string())
    });
    own.into_iter()
        .chain(["/bin/sh".to_string()])
        .find(|s| s.starts_with('/') && find_program(s, &[]).is_ok())
}

/// A pseudo-terminal pair, both ends close-on-exec.
struct Pty {
    master: OwnedFd,
    slave: OwnedFd,
}

fn open_pty(rows: u16, cols: u16) -> std::io::Result<Pty> {
    let master =
        rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    rustix::pty::grantpt(&master)?;
    rustix::pty::unlockpt(&master)?;
    let name = rustix::pty::ptsname(&master, Vec::new())?;
    let slave = rustix::fs::open(
        name.as_c_str(),
        OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    resize(&master, rows, cols);
    Ok(Pty { master, slave })
}

fn resize(master: &impl AsFd, rows: u16, cols: u16) {
    let ws = rustix::termios::Winsize {
        ws_row: rows.max(1),
        ws_col: cols.max(1),
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let _ = rustix::termios::tcsetwinsize(master, ws);
}

/// Runs one exec session to its end.
pub fn run(req: ExecRequest, reader: VsockStream, writer: Writer) -> Result<()> {
    let (who, program) = match prepare(&req) {
        Ok(p) => p,
        Err(refusal) => return refuse(&writer, refusal),
    };
    let arg0 = match is_login_shell(&req) && program != req.argv[0] {
        // The fallback shell, by its own name.
        true => format!("-{}", program.rsplit('/').next().unwrap_or("sh")),
        false => req.arg0.clone().unwrap_or_else(|| req.argv[0].clone()),
    };
    // Held until the process ends: the forwarded agent's socket lives as long as a session
    // that asked for it.
    let (_forward, forward_failed) = match req.ssh_agent {
        true => match ssh_agent::forward(who.uid, who.gid) {
            Ok(f) => (Some(f), None),
            Err(e) => (None, Some(format!("{e:#}"))),
        },
        false => (None, None),
    };
    let mut cmd = Command::new(&program);
    cmd.args(&req.argv[1..])
        .arg0(&arg0)
        .env_clear()
        .current_dir(&req.cwd);
    for e in &req.env {
        if let Some((k, v)) = e.split_once('=') {
            cmd.env(k, v);
        }
    }
    let pty = if req.tty {
        Some(open_pty(req.rows, req.cols).context("opening a terminal")?)
    } else {
        None
    };
    match &pty {
        Some(p) => {
            let slave = || p.slave.try_clone().context("duplicating the terminal");
            cmd.stdin(Stdio::from(slave()?))
                .stdout(Stdio::from(slave()?))
                .stderr(Stdio::from(slave()?));
        }
        None => {
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
        }
    }
    sys::child_setup(
        &mut cmd,
        sys::ChildSetup {
            controlling_tty: req.tty,
            uid: who.uid,
            gid: who.gid,
            groups: who.groups.clone(),
        },
    );
    let spawned = cmd.spawn();
    // The command holds copies of the pty's slave end; the master sees the end of output
    // only once every copy outside the process is closed.
    drop(cmd);
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let message = format!("exec: \"{}\": {e}", req.argv[0]);
            let refusal = match e.kind() {
                std::io::ErrorKind::NotFound => Refusal::NotFound(message),
                _ => Refusal::CannotRun(message),
            };
            return refuse(&writer, refusal);
        }
    };
    let pid = child.id() as i32;
    reply(&writer, Message::Started { pid })?;
    if let Some(why) = forward_failed {
        log!("ssh agent forwarding: {why}");
        let end = if req.tty { "\r\n" } else { "\n" };
        let warning = format!("container: the SSH agent is not forwarded: {why}{end}");
        let _ = wire::data(&writer, Kind::Stderr, warning.as_bytes());
    }

    let (done_tx, done_rx) = mpsc::channel::<()>();
    let mut pumps = 0;
    let mut pump = |source: Box<dyn Read + Send>, kind: Kind| {
        let (w, done) = (writer.clone(), done_tx.clone());
        pumps += 1;
        std::thread::spawn(move || {
            pump_output(source, kind, &w);
            let _ = done.send(());
        });
    };
    let (stdin, master): (Box<dyn Write + Send>, Option<OwnedFd>) = match pty {
        Some(Pty { master, slave }) => {
            drop(slave);
            pump(
                Box::new(std::fs::File::from(
                    master.try_clone().context("duplicating the terminal")?,
                )),
                Kind::Stdout,
            );
            (
                Box::new(std::fs::File::from(
                    master.try_clone().context("duplicating the terminal")?,
                )),
                Some(master),
            )
        }
        None => {
            let out = child.stdout.take().expect("stdout is piped");
            let err = child.stderr.take().expect("stderr is piped");
            pump(Box::new(out), Kind::Stdout);
            pump(Box::new(err), Kind::Stderr);
            (Box::new(child.stdin.take().expect("stdin is piped")), None)
        }
    };
    drop(done_tx);
    let exited = Arc::new(AtomicBool::new(false));
    relay_input(reader, stdin, master, pid, req.tty, exited.clone());

    let status = child
        .wait()
        .with_context(|| format!("waiting for {program} (pid {pid})"))?;
    exited.store(true, Ordering::SeqCst);
    // Output written before the exit is still in the pipes: drain it, but do not wait for
    // children the process left running with its output open.
    let deadline = std::time::Instant::now() + DRAIN_AFTER_EXIT;
    for _ in 0..pumps {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if done_rx.recv_timeout(left).is_err() {
            break;
        }
    }
    reply(
        &writer,
        Message::Exit {
            code: status.code(),
            signal: status.signal(),
        },
    )?;
    Ok(())
}

/// Tells the host the process cannot start, and why.
fn refuse(writer: &Writer, refusal: Refusal) -> Result<()> {
    let code = refusal.code();
    reply(writer, error(refusal, Some(code)))?;
    Ok(())
}

/// Relays the host's frames to the process until the host closes the session: stdin
/// through a queue (a process that does not read must not hold up signals), resizes and
/// signals directly.
fn relay_input(
    mut reader: VsockStream,
    stdin: Box<dyn Write + Send>,
    master: Option<OwnedFd>,
    pid: i32,
    tty: bool,
    exited: Arc<AtomicBool>,
) {
    let (tx, rx) = mpsc::sync_channel::<Option<Vec<u8>>>(STDIN_QUEUE);
    std::thread::spawn(move || {
        let mut stdin = stdin;
        while let Ok(Some(bytes)) = rx.recv() {
            if stdin.write_all(&bytes).is_err() {
                return;
            }
        }
        // End of input: on a terminal, the EOF character; on a pipe, closing it.
        if tty {
            let _ = stdin.write_all(&[4]);
            // Keep the terminal open: closing the master would hang the session up.
            while rx.recv().is_ok() {}
        }
    });
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        while let Ok(Some(frame)) = read(&mut reader) {
            match frame {
                Frame::Data(Kind::Stdin, bytes) => {
                    if let Some(t) = &tx
                        && t.send(Some(bytes)).is_err()
                    {
                        tx = None;
                    }
                }
                Frame::Message(Message::StdinEof) => {
                    if let Some(t) = tx.take() {
                        let _ = t.send(None);
                        if tty {
                            tx = Some(t);
                        }
                    }
                }
                Frame::Message(Message::Resize { rows, cols }) => {
                    if let Some(m) = &master {
                        resize(m, rows, cols);
                    }
                }
                // After the exit the pid may belong to someone else.
                Frame::Message(Message::Signal { signal }) if !exited.load(Ordering::SeqCst) => {
                    let _ = sys::kill_raw(-pid, signal).or_else(|_| sys::kill_raw(pid, signal));
                }
                _ => {}
            }
        }
    });
}

/// Copies a process's output into frames until EOF (or EIO from a hung-up pty).
fn pump_output(mut r: Box<dyn Read + Send>, kind: Kind, w: &Writer) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
            Ok(n) => {
                if wire::data(w, kind, &buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nsudo:x:27:alice\nalice:x:1000:\ndocker:x:999:bob,alice\n";

    fn req(user: Option<&str>, uid: Option<u32>, gid: Option<u32>) -> ExecRequest {
        ExecRequest {
            user: user.map(str::to_string),
            uid,
            gid,
            ..Default::default()
        }
    }

    #[test]
    fn a_login_shell_missing_from_the_image_falls_back_to_one_it_has() {
        let mut login = req(None, Some(1000), None);
        login.argv = vec!["/bin/zsh-not-here".into()];
        login.arg0 = Some("-zsh-not-here".into());
        assert!(is_login_shell(&login));
        // This host has /bin/sh: the passwd shell if runnable, else /bin/sh.
        assert_eq!(
            login_shell_fallback(PASSWD, 1000).as_deref(),
            Some("/bin/sh")
        );
        let odd = "alice:x:1000:1000::/home/alice:/nonexistent/shell\n";
        assert_eq!(login_shell_fallback(odd, 1000).as_deref(), Some("/bin/sh"));
        // A plain command is not a login shell: its absence is reported, not replaced.
        let mut plain = login.clone();
        plain.arg0 = None;
        assert!(!is_login_shell(&plain));
        plain.argv.push("-c".into());
        plain.arg0 = Some("-x".into());
        assert!(!is_login_shell(&plain));
    }

    #[test]
    fn users_get_their_groups_from_the_guest() {
        let alice = Identity {
            uid: 1000,
            gid: 1000,
            groups: vec![1000, 27, 999],
        };
        assert_eq!(
            identity(&req(Some("alice"), None, None), PASSWD, GROUP).unwrap(),
            alice
        );
        assert_eq!(
            identity(&req(None, Some(1000), None), PASSWD, GROUP).unwrap(),
            alice
        );
        assert_eq!(
            identity(&req(None, Some(1000), Some(5)), PASSWD, GROUP)
                .unwrap()
                .groups,
            vec![5, 27, 999]
        );
        // A uid without an entry runs with its own number as group and nothing else.
        assert_eq!(
            identity(&req(None, Some(4242), None), PASSWD, GROUP).unwrap(),
            Identity {
                uid: 4242,
                gid: 4242,
                groups: vec![4242]
            }
        );
        assert_eq!(
            identity(&req(None, None, None), PASSWD, GROUP).unwrap().uid,
            0
        );
        // Groups given by the host replace the memberships /etc/group lists.
        let root_plus = ExecRequest {
            groups: Some(vec![1000]),
            ..req(None, Some(0), Some(0))
        };
        assert_eq!(
            identity(&root_plus, PASSWD, GROUP).unwrap(),
            Identity {
                uid: 0,
                gid: 0,
                groups: vec![0, 1000]
            }
        );
        let alice_only = ExecRequest {
            groups: Some(vec![1000]),
            ..req(None, Some(1000), None)
        };
        assert_eq!(
            identity(&alice_only, PASSWD, GROUP).unwrap().groups,
            vec![1000]
        );
        let refusal = identity(&req(Some("mallory"), None, None), PASSWD, GROUP).unwrap_err();
        assert_eq!(refusal.code(), 126);
        assert!(refusal.to_string().contains("mallory"), "{refusal}");
    }

    #[test]
    fn programs_are_found_or_refused_like_docker() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("tool"), "").unwrap();
        std::fs::set_permissions(d.join("tool"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(d.join("data"), "").unwrap();
        let env = vec![format!("PATH=/nonexistent:{}", d.display())];
        assert_eq!(
            find_program("tool", &env).unwrap(),
            format!("{}/tool", d.display())
        );
        let refusal = find_program("nope", &env).unwrap_err();
        assert_eq!(refusal.code(), 127);
        assert_eq!(
            refusal.to_string(),
            "exec: \"nope\": executable file not found in $PATH"
        );
        assert_eq!(find_program("data", &env).unwrap_err().code(), 126);
        let data = format!("{}/data", d.display());
        assert_eq!(find_program(&data, &env).unwrap_err().code(), 126);
        assert_eq!(
            find_program(&d.display().to_string(), &env)
                .unwrap_err()
                .code(),
            126
        );
        assert_eq!(find_program("/no/such/tool", &env).unwrap_err().code(), 127);
    }
}
