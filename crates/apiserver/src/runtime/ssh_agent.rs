//! The host end of SSH agent forwarding. While an exec session forwards its caller's agent
//! ([`SshAgents::forward`]), the service listens where vhost-device-vsock delivers the
//! guest's connections to [`SSH_AGENT_PORT`] (beside the hybrid socket, in the VM user's
//! directory, for that user alone) and
//! joins each one to the caller's agent socket, connected to with the caller's identity.
//!
//! Invariants: the service never opens an agent socket as root for a user: the path is
//! resolved and connected to on a thread with the caller's uid, gid and groups
//! (`sys::as_user`), so a user reaches only an agent their own processes can; and the socket
//! must be the caller's (owned by them, served by a process of theirs), so naming another
//! user's agent, even one left open to all, gets nothing. Root may use any agent (it can
//! anyway). A guest connection goes to the latest forwarding session of its VM still
//! running; a refused one is answered as by an agent that refuses everything. The listener
//! lives while any session of the VM forwards.

use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use container_agent_proto::SSH_AGENT_PORT;
use container_agent_proto::client::ReadyListener;

use super::{GuestPorts, RuntimeError, sys};

/// A caller's agent: its socket and who connects to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshAgentTarget {
    pub path: PathBuf,
    pub uid: u32,
    pub gid: u32,
    /// The caller's supplementary groups.
    pub groups: Vec<u32>,
}

/// The forwarding sessions of every running VM.
#[derive(Debug, Default)]
pub struct SshAgents {
    /// By the VM's guest-connection socket path.
    vms: Mutex<HashMap<PathBuf, Listening>>,
}

/// A VM's forwarding sessions by id, oldest first, shared with its listener.
type Sessions = Arc<Mutex<Vec<(u64, Arc<SshAgentTarget>)>>>;

/// One VM's listener and its forwarding sessions.
#[derive(Debug)]
struct Listening {
    sessions: Sessions,
    next: u64,
    task: tokio::task::JoinHandle<()>,
}

/// A session's forwarding; dropping it ends it (and the listener, with the last one).
#[derive(Debug)]
pub struct Forwarding {
    agents: Arc<SshAgents>,
    path: PathBuf,
    id: u64,
}

impl SshAgents {
    /// Forwards `target` to the guest of `vm` until the returned value is dropped.
    pub fn forward(
        self: &Arc<Self>,
        vm: &GuestPorts,
        target: SshAgentTarget,
    ) -> Result<Forwarding, RuntimeError> {
        let path = ReadyListener::path_for(&vm.vsock, SSH_AGENT_PORT);
        let mut vms = self.lock();
        if !vms.contains_key(&path) {
            let sessions = Arc::new(Mutex::new(Vec::new()));
            let io = |source| RuntimeError::Io {
                what: "listening for the forwarded SSH agent on",
                path: path.clone(),
                source,
            };
            let listener = listen(&path, vm.uid).map_err(io)?;
            let task = tokio::spawn(accept(listener, sessions.clone()));
            vms.insert(
                path.clone(),
                Listening {
                    sessions,
                    next: 0,
                    task,
                },
            );
        }
        let vm = vms.get_mut(&path).expect("inserted above");
        let id = vm.next;
        vm.next += 1;
        lock(&vm.sessions).push((id, Arc::new(target)));
        Ok(Forwarding {
            agents: self.clone(),
            path,
            id,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, Listening>> {
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Forwarding {
    fn drop(&mut self) {
        let mut vms = self.agents.lock();
        let Some(vm) = vms.get_mut(&self.path) else {
            return;
        };
        let mut sessions = lock(&vm.sessions);
        sessions.retain(|(id, _)| *id != self.id);
        if sessions.is_empty() {
            drop(sessions);
            vm.task.abort();
            vms.remove(&self.path);
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Binds the guest-connection socket for vhost-device-vsock alone: it connects to it as
/// `uid`, the VM's user (root for a VM an older service started).
fn listen(path: &Path, uid: u32) -> std::io::Result<tokio::net::UnixListener> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    std::os::unix::fs::lchown(path, Some(uid), None)?;
    listener.set_nonblocking(true)?;
    tokio::net::UnixListener::from_std(listener)
}

/// Serves the guest's connections, each with the latest session's agent.
async fn accept(listener: tokio::net::UnixListener, sessions: Sessions) {
    loop {
        let guest = match listener.accept().await {
            Ok((guest, _)) => guest,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a forwarded SSH agent connection");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(target) = lock(&sessions).last().map(|(_, t)| t.clone()) else {
            tokio::spawn(refuse(guest));
            continue;
        };
        tokio::spawn(async move {
            let mut guest = guest;
            match connect(&target).await {
                Ok(mut agent) => {
                    let _ = tokio::io::copy_bidirectional(&mut guest, &mut agent).await;
                }
                Err(e) => {
                    tracing::warn!(
                        uid = target.uid,
                        path = %target.path.display(),
                        error = %e,
                        "SSH agent connection from a machine refused"
                    );
                    refuse(guest).await;
                }
            }
        });
    }
}

/// The caller's agent, connected to as the caller and checked to be served by them.
async fn connect(target: &SshAgentTarget) -> std::io::Result<tokio::net::UnixStream> {
    let t = target.clone();
    let agent = tokio::task::spawn_blocking(move || connect_as_caller(&t))
        .await
        .map_err(std::io::Error::other)??;
    agent.set_nonblocking(true)?;
    let agent = tokio::net::UnixStream::from_std(agent)?;
    let served_by = agent.peer_cred()?.uid();
    if target.uid != 0 && served_by != target.uid {
        return Err(std::io::Error::other(format!(
            "the socket is served by uid {served_by}, not the caller's"
        )));
    }
    Ok(agent)
}

/// Answers each request of a refused connection as an agent that refuses everything
/// (`SSH_AGENT_FAILURE`), until the client closes: `ssh-add -l` then says the agent refused.
/// Closing the connection instead is not enough: vhost-device-vsock does not tell the guest
/// that a connection the host closed before any data went through has ended, and the client
/// would wait forever.
async fn refuse(mut guest: tokio::net::UnixStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    /// The agent protocol's answer to a request it refuses (draft-miller-ssh-agent).
    const SSH_AGENT_FAILURE: u8 = 5;
    /// Longest request read (and skipped); OpenSSH's own agent takes 256 KiB.
    const MAX_REQUEST: u32 = 256 * 1024;
    loop {
        let len = match guest.read_u32().await {
            Ok(len) if len <= MAX_REQUEST => len,
            _ => return,
        };
        let mut body = (&mut guest).take(u64::from(len));
        match tokio::io::copy(&mut body, &mut tokio::io::sink()).await {
            Ok(n) if n == u64::from(len) => {}
            _ => return,
        }
        if guest
            .write_all(&[0, 0, 0, 1, SSH_AGENT_FAILURE])
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Connects to the caller's agent socket as the caller: the kernel checks every directory on
/// the way and the socket's mode for them. The socket must be theirs.
fn connect_as_caller(target: &SshAgentTarget) -> std::io::Result<std::os::unix::net::UnixStream> {
    let (path, uid) = (target.path.clone(), target.uid);
    sys::as_user(target.uid, target.gid, &target.groups, move || {
        let meta = std::fs::metadata(&path)?;
        if !meta.file_type().is_socket() {
            return Err(std::io::Error::other("not a socket"));
        }
        if uid != 0 && meta.uid() != uid {
            return Err(std::io::Error::other(format!(
                "the socket belongs to uid {}, not the caller",
                meta.uid()
            )));
        }
        std::os::unix::net::UnixStream::connect(&path)
    })?
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The guest ports of a VM whose hybrid socket is `vsock`, served as this test's user.
    fn ports(vsock: &Path) -> GuestPorts {
        GuestPorts {
            vsock: vsock.to_path_buf(),
            uid: nix::unistd::getuid().as_raw(),
        }
    }

    /// SSH2_AGENTC_REQUEST_IDENTITIES, as `ssh-add -l` sends it.
    const LIST: [u8; 5] = [0, 0, 0, 1, 11];
    /// What a refusing agent answers.
    const REFUSED: [u8; 5] = [0, 0, 0, 1, 5];

    /// An "agent" at `path` that answers a request with `reply` and closes.
    fn fake_agent(path: &Path, reply: &'static [u8]) {
        let listener = tokio::net::UnixListener::bind(path).unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut request = [0u8; 5];
                let _ = s.read_exact(&mut request).await;
                let _ = s.write_all(reply).await;
            }
        });
    }

    /// What a guest client asking for the keys gets back.
    async fn guest_reads(vsock: &Path) -> Vec<u8> {
        let path = ReadyListener::path_for(vsock, SSH_AGENT_PORT);
        let mut s = tokio::net::UnixStream::connect(path).await.unwrap();
        s.write_all(&LIST).await.unwrap();
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut got))
            .await
            .expect("the connection ends")
            .unwrap();
        got
    }

    fn target(path: &Path, uid: u32) -> SshAgentTarget {
        SshAgentTarget {
            path: path.to_path_buf(),
            uid,
            gid: uid,
            groups: Vec::new(),
        }
    }

    #[tokio::test]
    async fn guest_connections_reach_the_latest_sessions_agent_while_one_runs() {
        let dir = tempfile::tempdir().unwrap();
        let vsock = dir.path().join("vsock.sock");
        let (first, second) = (dir.path().join("a1"), dir.path().join("a2"));
        fake_agent(&first, b"first");
        fake_agent(&second, b"second");
        let uid = nix::unistd::geteuid().as_raw();
        let agents = Arc::new(SshAgents::default());
        let one = agents.forward(&ports(&vsock), target(&first, uid)).unwrap();
        assert_eq!(guest_reads(&vsock).await, b"first");
        let two = agents
            .forward(&ports(&vsock), target(&second, uid))
            .unwrap();
        assert_eq!(guest_reads(&vsock).await, b"second");
        drop(two);
        assert_eq!(guest_reads(&vsock).await, b"first");
        drop(one);
        assert!(!ReadyListener::path_for(&vsock, SSH_AGENT_PORT).exists());
    }

    #[tokio::test]
    async fn another_users_agent_is_never_reached() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let vsock = dir.path().join("vsock.sock");
        // Root's agent, left open to everyone: the file mode lets nobody in, but it is not
        // theirs.
        let open = dir.path().join("open-agent");
        fake_agent(&open, b"root's keys");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        // And one in a private directory, as ssh-agent makes them.
        let private = dir.path().join("private");
        std::fs::create_dir(&private).unwrap();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
        let hidden = private.join("agent");
        fake_agent(&hidden, b"root's keys");
        let agents = Arc::new(SshAgents::default());
        for path in [&open, &hidden] {
            let _f = agents.forward(&ports(&vsock), target(path, 65534)).unwrap();
            assert_eq!(guest_reads(&vsock).await, REFUSED, "{}", path.display());
        }
        // Root reaches both.
        let _f = agents.forward(&ports(&vsock), target(&hidden, 0)).unwrap();
        assert_eq!(guest_reads(&vsock).await, b"root's keys");
    }
}
