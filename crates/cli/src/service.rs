//! Finding the service: connect to its socket, and start it when it is not running (only root
//! can: it is a system-wide service).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use container_api::client::ClientError;
use container_api::system::SystemStatus;
use container_api::{Client, ExitCode, paths};

use crate::exit::failed;

/// A client for the configured socket, starting the service first if needed.
pub async fn connect() -> anyhow::Result<Client> {
    let client = Client::new(paths::socket());
    match client.get::<SystemStatus>("/system/status").await {
        Ok(_) => Ok(client),
        Err(ClientError::NotRunning { .. }) => {
            start().await?;
            Ok(client)
        }
        Err(e) => Err(e.into()),
    }
}

/// The service binary: next to this CLI, else on PATH.
fn apiserver_binary() -> PathBuf {
    let name = "container-apiserver";
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(name)))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// The log file the service writes to when the CLI starts it.
pub fn log_file() -> PathBuf {
    paths::root().join("logs/apiserver.log")
}

/// Starts the service in the background and waits until it answers. Returns false when it was
/// already running.
pub async fn start() -> anyhow::Result<bool> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    let client = Client::new(paths::socket());
    if client.get::<SystemStatus>("/system/status").await.is_ok() {
        return Ok(false);
    }
    if !nix::unistd::geteuid().is_root() {
        return Err(failed(
            ExitCode::ServiceUnavailable,
            "the container service is not running; start it with `sudo container system start`",
        ));
    }
    let log = log_file();
    // The service's log names every user's machines and images: root's alone.
    if let Some(dir) = log.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log)
        .with_context(|| format!("opening the service log {}", log.display()))?;
    // A log made before it was private.
    out.set_permissions(std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("making {} private", log.display()))?;
    let binary = apiserver_binary();
    let mut command = std::process::Command::new(&binary);
    command
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        // So that `system status` can say what runs it.
        .env("CONTAINER_STARTED_BY", "cli")
        // Its own process group: a Ctrl-C at this terminal must not stop the service.
        .process_group(0);
    use std::os::unix::process::CommandExt;
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if client.get::<SystemStatus>("/system/status").await.is_ok() {
            return Ok(true);
        }
        // Either way there is still no service to talk to.
        if let Some(status) = child.try_wait()? {
            return Err(failed(
                ExitCode::ServiceUnavailable,
                format!(
                    "the container service exited at start ({status}); see {}",
                    log.display()
                ),
            ));
        }
        if Instant::now() > deadline {
            return Err(failed(
                ExitCode::ServiceUnavailable,
                format!(
                    "the container service did not answer within 20 s; see {}",
                    log.display()
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
