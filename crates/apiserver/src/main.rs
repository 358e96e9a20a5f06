//! `container-apiserver`: the system-wide service behind the `container` CLI.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use container_apiserver::config::{self, HostFacts};
use container_apiserver::core::{Core, ServiceOptions};
use container_apiserver::http;

/// The container service. Normally started by `container system start`.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Data directory: images, machines, kernels.
    #[arg(long, env = "CONTAINER_ROOT", default_value = container_api::paths::DEFAULT_ROOT)]
    root: PathBuf,
    /// Directory for runtime files (sockets, pid files).
    #[arg(long, env = "CONTAINER_RUN_DIR", default_value = container_api::paths::DEFAULT_RUN_DIR)]
    run_dir: PathBuf,
    /// The API socket.
    #[arg(long, env = "CONTAINER_SOCKET", default_value = container_api::paths::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Config files to read instead of the standard ones, highest precedence first.
    #[arg(long = "config")]
    config_files: Vec<PathBuf>,
    /// Keep the machines' names in this hosts file, instead of what `[network] host-names`
    /// and `hosts-file` say (systemd-resolved or /etc/hosts). Tests give a file of their own.
    #[arg(long, env = "CONTAINER_HOSTS_FILE")]
    hosts_file: Option<PathBuf>,
    /// Relay the machines' DNS queries outside their domain to the nameservers of this
    /// resolv.conf, instead of the one `[network] resolv-conf` names (/etc/resolv.conf).
    /// Tests give a file of their own.
    #[arg(long, env = "CONTAINER_RESOLV_CONF")]
    resolv_conf: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    // Before any thread starts: taking the descriptors clears LISTEN_FDS from the environment,
    // so no helper the service spawns believes it was socket-activated.
    let inherited = match listenfd::ListenFd::from_env().take_unix_listener(0) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("container-apiserver: the socket systemd passed is not usable: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    container_apiserver::manager::detect(inherited.is_some());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CONTAINER_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if let Err(e) = container_apiserver::runtime::helpers::raise_open_files_limit() {
        tracing::warn!(
            "cannot raise the open-file limit (shares of many files may fail with EMFILE): {e}"
        );
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("container-apiserver: starting the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(args, inherited));
    // Supervision tasks of running machines go on until their VMs exit; the service must
    // not wait for them (machines outlive the service).
    runtime.shutdown_background();
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The chain is printed once, here.
            eprintln!("container-apiserver: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Removes the half-written state files (temporaries of `fsutil::atomic_write`) that a
/// service killed mid-write left in the state directories; the files they were to replace
/// are whole, old or new. Run under the instance lock.
fn remove_stale_temporaries(root: &std::path::Path) {
    use container_apiserver::fsutil;
    let machines = root.join("machines");
    let mut dirs = vec![
        root.to_path_buf(),
        machines.clone(),
        root.join("network"),
        root.join("images"),
        root.join("images/auth"),
        root.join("kernels"),
    ];
    if let Ok(entries) = std::fs::read_dir(&machines) {
        dirs.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
    }
    let removed: usize = dirs
        .iter()
        .map(|d| fsutil::remove_stale_temporaries(d))
        .sum();
    if removed > 0 {
        tracing::info!(
            removed,
            "removed state files half-written by a service that was killed"
        );
    }
}

/// Takes the root's instance lock for the life of the process: one service per data
/// directory. The lock file names the holder's pid for the message a second one prints.
fn lock_root(root: &std::path::Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    use std::io::{Read, Seek, Write};
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let path = root.join("apiserver.lock");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut lock = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
    {
        Ok(lock) => lock,
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => String::new(),
                pid => format!(" (pid {pid})"),
            };
            anyhow::bail!(
                "another container service is already running on {}{holder}; stop it with \
                 `container system stop`, or give this one another --root",
                root.display()
            );
        }
        Err((_, e)) => return Err(e).with_context(|| format!("locking {}", path.display())),
    };
    lock.set_len(0)?;
    lock.rewind()?;
    writeln!(lock, "{}", std::process::id())?;
    Ok(lock)
}

/// The API socket: the one systemd passed (socket activation, `container-apiserver.socket`),
/// else one bound here. Returns whether it is ours to remove at exit (systemd keeps its own).
async fn listen(
    socket: &std::path::Path,
    inherited: Option<std::os::unix::net::UnixListener>,
) -> anyhow::Result<(tokio::net::UnixListener, bool)> {
    match inherited {
        Some(listener) => {
            listener
                .set_nonblocking(true)
                .context("making the inherited socket non-blocking")?;
            let listener = tokio::net::UnixListener::from_std(listener)
                .context("adopting the socket systemd passed")?;
            Ok((listener, false))
        }
        None => Ok((http::bind(socket).await?, true)),
    }
}

async fn run(
    args: Args,
    inherited: Option<std::os::unix::net::UnixListener>,
) -> anyhow::Result<()> {
    let files = if args.config_files.is_empty() {
        config::config_files(&config::install_prefix())
    } else {
        args.config_files.clone()
    };
    let mut config = config::load(&files, HostFacts::detect())?;
    if let Some(hosts_file) = &args.hosts_file {
        config.names.host_names = config::HostNames::Hosts;
        config.names.hosts_file = hosts_file.clone();
    }
    if let Some(resolv_conf) = &args.resolv_conf {
        config.names.resolv_conf = resolv_conf.clone();
    }
    // Before anything under the root is touched: start-up cleanup of a second instance would
    // destroy the first one's work in flight.
    let _instance = lock_root(&args.root)?;
    remove_stale_temporaries(&args.root);
    let options = ServiceOptions {
        root: args.root,
        run_dir: args.run_dir,
        socket: args.socket.clone(),
    };
    let ports = container_apiserver::wiring::ports(&options, &config).await?;
    let core = Core::open(options, config, ports).context("opening the service state")?;
    core.follow_reboots();
    core.follow_deaths();
    core.autostart_all();
    core.forward_all();
    let (listener, owned) = listen(&args.socket, inherited).await?;
    tracing::info!(socket = %args.socket.display(), pid = std::process::id(), run_by = %container_apiserver::manager::run_by(), "container service listening");
    // Under a `Type=notify` unit, `systemctl start` returns once the socket answers.
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!("cannot tell systemd the service is ready: {e}");
    }
    let stop = core.clone();
    let shutdown = async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = stop.shutdown_requested() => {}
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("container service stopping; machines keep running");
    };
    http::serve(listener, core, shutdown).await?;
    if owned {
        let _ = std::fs::remove_file(&args.socket);
    }
    Ok(())
}
