//! The forwarded SSH agent's guest end: while at least one exec session asks for it
//! (`ExecRequest::ssh_agent`), the agent listens on [`SSH_AGENT_SOCKET`] and relays each
//! connection, byte for byte, to the host's [`SSH_AGENT_PORT`] over vsock; the service
//! connects that to its caller's own agent, as the caller (the host decides whose agent it
//! is, never the guest).
//!
//! Invariants: the socket exists exactly while a forwarding session runs (a [`Forward`] is
//! alive); it is owned by the user of the latest session that asked for it and mode 0600
//! from the moment its name appears (bound in a private directory, then renamed into place),
//! so no other guest account can connect to it in between.

use std::net::Shutdown;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use container_agent_proto::{SSH_AGENT_PORT, SSH_AGENT_SOCKET};
use vsock::{VMADDR_CID_HOST, VsockStream};

use crate::console::log;

/// The listener while sessions forward, and how many do.
struct Listening {
    sessions: usize,
    listener: Arc<UnixListener>,
}

static STATE: Mutex<Option<Listening>> = Mutex::new(None);

/// One session's hold on the forwarded agent; the last one dropped removes the socket.
#[must_use]
pub struct Forward(());

/// Makes the forwarded agent available to `uid`'s processes (the session's user), starting
/// the listener unless another session already runs it.
pub fn forward(uid: u32, gid: u32) -> Result<Forward> {
    let mut state = lock();
    let path = Path::new(SSH_AGENT_SOCKET);
    match state.as_mut() {
        Some(l) => {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .with_context(|| format!("giving {SSH_AGENT_SOCKET} to uid {uid}"))?;
            l.sessions += 1;
        }
        None => {
            let listener = Arc::new(bind(path, uid, gid)?);
            let accepting = listener.clone();
            std::thread::spawn(move || accept(&accepting));
            *state = Some(Listening {
                sessions: 1,
                listener,
            });
        }
    }
    Ok(Forward(()))
}

impl Drop for Forward {
    fn drop(&mut self) {
        let mut state = lock();
        let Some(l) = state.as_mut() else { return };
        l.sessions -= 1;
        if l.sessions == 0 {
            let _ = std::fs::remove_file(SSH_AGENT_SOCKET);
            // Wakes the accepting thread, which then ends.
            let _ = nix::sys::socket::shutdown(
                std::os::fd::AsRawFd::as_raw_fd(&*l.listener),
                nix::sys::socket::Shutdown::Both,
            );
            *state = None;
        }
    }
}

fn lock() -> std::sync::MutexGuard<'static, Option<Listening>> {
    STATE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Binds the socket at `path` for `uid` alone: in a fresh 0700 directory beside it, given to
/// the user and made 0600 there, then renamed into place (replacing one a crash left).
fn bind(path: &Path, uid: u32, gid: u32) -> Result<UnixListener> {
    let parent = path.parent().context("the socket path has no directory")?;
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let private = parent.join(format!(".ssh-auth.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::create_dir(&private).with_context(|| format!("creating {}", private.display()))?;
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700))?;
    let placed = (|| -> Result<UnixListener> {
        let staged = private.join("sock");
        let listener = UnixListener::bind(&staged)
            .with_context(|| format!("listening on {}", staged.display()))?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
        std::os::unix::fs::chown(&staged, Some(uid), Some(gid))
            .with_context(|| format!("giving {} to uid {uid}", staged.display()))?;
        std::fs::rename(&staged, path)
            .with_context(|| format!("placing the socket at {}", path.display()))?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&private);
    placed
}

/// Accepts guest clients until the listener is shut down; a thread relays each.
fn accept(listener: &UnixListener) {
    for client in listener.incoming() {
        match client {
            Ok(client) => {
                std::thread::spawn(move || {
                    if let Err(e) = relay(client) {
                        log!("ssh agent forwarding: {e:#}");
                    }
                });
            }
            // Shut down: the last forwarding session ended.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return,
            Err(e) => {
                log!("ssh agent forwarding: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Carries one client's bytes to the host and back until both sides are done.
fn relay(mut client: UnixStream) -> Result<()> {
    let mut host = VsockStream::connect_with_cid_port(VMADDR_CID_HOST, SSH_AGENT_PORT)
        .context("connecting to the host")?;
    let mut client_w = client.try_clone()?;
    let mut host_w = host.try_clone()?;
    let (answered, answer_wait) = std::sync::mpsc::channel::<()>();
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut client, &mut host_w);
        let _ = host_w.shutdown(Shutdown::Write);
        // The host's last answer may still be on its way, but a host end that closed might
        // never be seen here (vhost-device-vsock does not always tell): give up after a while
        // rather than hold the relay forever.
        if let Err(RecvTimeoutError::Timeout) = answer_wait.recv_timeout(HOST_GRACE) {
            let _ = host_w.shutdown(Shutdown::Both);
        }
    });
    let _ = std::io::copy(&mut host, &mut client_w);
    let _ = client_w.shutdown(Shutdown::Write);
    drop(answered);
    let _ = up.join();
    Ok(())
}

/// How long the host may take to finish once the client is done sending.
const HOST_GRACE: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn the_socket_appears_as_the_users_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host-services/ssh-auth.sock");
        let (uid, gid) = (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        );
        // Root gives it away; others can only keep it.
        let (to_uid, to_gid) = if uid == 0 { (1500, 1500) } else { (uid, gid) };
        let _listener = bind(&path, to_uid, to_gid).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!((meta.uid(), meta.gid()), (to_uid, to_gid));
        // Nothing but the socket is left beside it.
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["ssh-auth.sock"]);
        // A second bind (a socket left by a crash) replaces it.
        drop(_listener);
        let _again = bind(&path, to_uid, to_gid).unwrap();
        assert!(UnixStream::connect(&path).is_ok());
    }
}
