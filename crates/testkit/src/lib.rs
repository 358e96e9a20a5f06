//! Test support shared by the workspace's test suites, used only as a dev-dependency (the
//! end-to-end harness excepted): where the repository and the test cache are, the one way a
//! test skips for a missing prerequisite (and fails instead in CI), and, with the `vm`
//! feature, what a test VM boots: the static guest agent and the guest kernel, fetched and
//! installed by the service's own runtime code.
//!
//! Invariant: a missing prerequisite is a skip on a developer's host and a failure when `CI`
//! is set, so a CI run never passes by testing nothing.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[cfg(feature = "vm")]
pub mod guest;

/// The repository root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("crates/testkit sits two levels below the root")
        .to_path_buf()
}

/// The cache test suites share across runs (`CONTAINER_TEST_CACHE`, else
/// `~/.cache/container-test-images`): the test images, the guest kernel.
pub fn cache() -> PathBuf {
    std::env::var_os("CONTAINER_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                .join(".cache/container-test-images")
        })
}

/// The service root in the test cache that holds the shared guest kernel.
pub fn kernel_root() -> PathBuf {
    cache().join("kernel-root")
}

/// The file whose lock serialises installing the kernel into [`kernel_root`] across test
/// processes.
pub fn kernel_lock() -> PathBuf {
    cache().join("kernel-root.lock")
}

/// Whether a prerequisite holds; when it does not, the test skips with `what` (returns
/// false), or fails when run in CI.
pub fn require(ok: bool, what: &str) -> bool {
    if ok {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("prerequisite missing in CI: {what}");
    }
    eprintln!("skipping: {what}");
    false
}

/// [`require`] over several named prerequisites: skips (or fails in CI) naming every one
/// that is missing.
pub fn require_all(prerequisites: &[(&str, bool)]) -> bool {
    let missing: Vec<&str> = prerequisites
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(what, _)| *what)
        .collect();
    require(missing.is_empty(), &format!("missing {missing:?}"))
}

/// Whether `tool` is on PATH.
pub fn on_path(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// [`require`] that `tool` is on PATH.
pub fn have(tool: &str) -> bool {
    require(
        on_path(tool),
        &format!("{tool} is not installed (scripts/install-deps.sh installs it)"),
    )
}

/// Sends the DNS message `query` to `at` and returns the answer's bytes: over UDP, or over
/// TCP with the two-byte length prefix (RFC 1035 4.2.2). Panics when nothing answers within
/// `wait`.
pub fn dns_exchange(
    at: std::net::SocketAddr,
    query: &[u8],
    tcp: bool,
    wait: std::time::Duration,
) -> Vec<u8> {
    use std::io::{Read, Write};
    if tcp {
        let mut s = std::net::TcpStream::connect_timeout(&at, wait).expect("the server takes TCP");
        s.set_read_timeout(Some(wait)).unwrap();
        let mut framed = (query.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(query);
        s.write_all(&framed).unwrap();
        let mut len = [0u8; 2];
        s.read_exact(&mut len).unwrap();
        let mut answer = vec![0u8; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut answer).unwrap();
        answer
    } else {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(wait)).unwrap();
        s.send_to(query, at).unwrap();
        let mut buf = [0u8; 1500];
        let n = s.recv(&mut buf).expect("the server answers UDP");
        buf[..n].to_vec()
    }
}
