//! `container system …`: start, stop and inspect the service; configuration; kernel.

use clap::{Args, Subcommand};
use container_api::size::format_size;
use container_api::system::{DiskUsage, KernelSetRequest, Property, SystemStatus, UsageRow};
use container_api::{Client, ExitCode, client::ClientError, paths};

use crate::exit::failed;
use crate::output::{self, Format, Tabular};
use crate::{service, systemd};

#[derive(Debug, Subcommand)]
pub enum SystemCommand {
    /// Start the service (machines it ran before are re-adopted); through systemd when its
    /// unit is installed.
    Start,
    /// Stop the service; running machines keep running.
    Stop,
    /// Show whether the service runs, with what, and what runs it (systemd or the CLI).
    Status(FormatArg),
    /// Show what your images and machines take on disk, and what pruning them would free.
    #[command(long_about = DF_ABOUT)]
    Df(FormatArg),
    /// Stream your machines' lifecycle events (`--format json`: one JSON object a line).
    #[command(long_about = super::events::LONG_ABOUT)]
    Events(super::events::EventsArgs),
    /// Check that this host can run machines: KVM, QEMU and helpers, kernel, network, disk.
    Check(super::check::CheckArgs),
    /// Show the service's log (its systemd journal when systemd runs it).
    Logs {
        /// Keep printing new lines.
        #[arg(short, long)]
        follow: bool,
    },
    /// Configuration properties.
    #[command(subcommand)]
    Property(PropertyCommand),
    /// The kernel machines boot.
    #[command(subcommand)]
    Kernel(KernelCommand),
}

#[derive(Debug, Args)]
pub struct FormatArg {
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub format: Format,
}

#[derive(Debug, Subcommand)]
pub enum PropertyCommand {
    /// List the merged configuration and where each value comes from.
    #[command(visible_alias = "ls")]
    List(FormatArg),
}

#[derive(Debug, Subcommand)]
pub enum KernelCommand {
    /// Install the kernel new machines boot.
    Set {
        /// A kernel image (bzImage/vmlinuz).
        #[arg(
            long,
            conflicts_with = "recommended",
            required_unless_present = "recommended"
        )]
        binary: Option<String>,
        /// The matching module tree (lib/modules/VERSION).
        #[arg(long, requires = "binary")]
        modules: Option<String>,
        /// Fetch the distribution's recommended cloud kernel (Debian/Ubuntu hosts).
        #[arg(long)]
        recommended: bool,
        /// No progress, only the result and errors.
        #[arg(short, long)]
        quiet: bool,
    },
}

impl Tabular for Property {
    fn headers() -> Vec<&'static str> {
        vec!["KEY", "VALUE", "SOURCE"]
    }
    fn row(&self) -> Vec<String> {
        let value = match &self.value {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        vec![self.key.clone(), value, self.source.clone()]
    }
    fn id(&self) -> String {
        self.key.clone()
    }
}

const DF_ABOUT: &str = "Show what your images and machines take on the host's disk.

IMAGES: the images you see (yours and the system-wide ones), counted once per digest; ACTIVE
ones were used to create one of your machines. SIZE is their blobs and base disks, each
counted once however many images share it. RECLAIMABLE is exactly what `container image prune
--all` frees: your own images no machine of yours uses, less what other names still need.

MACHINES: your machines (every machine, for root); ACTIVE ones are running. SIZE is their
disks and snapshots; RECLAIMABLE is that of the stopped ones, which deleting them frees.

Sizes are blocks allocated on the host, not apparent sizes.";

/// A line of `system df`'s table.
struct DfRow(&'static str, UsageRow);

impl Tabular for DfRow {
    fn headers() -> Vec<&'static str> {
        vec!["TYPE", "TOTAL", "ACTIVE", "SIZE", "RECLAIMABLE"]
    }
    fn row(&self) -> Vec<String> {
        let r = &self.1;
        let share = (r.reclaimable * 100)
            .checked_div(r.size)
            .unwrap_or(0)
            .min(100);
        vec![
            self.0.to_string(),
            r.total.to_string(),
            r.active.to_string(),
            format_size(r.size),
            format!("{} ({share}%)", format_size(r.reclaimable)),
        ]
    }
    fn id(&self) -> String {
        self.0.to_string()
    }
}

impl serde::Serialize for DfRow {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.1.serialize(s)
    }
}

/// `system df`: a table of the two kinds, or the whole answer as JSON, YAML or TOML.
fn render_df(usage: &DiskUsage, format: Format) -> anyhow::Result<String> {
    match format {
        Format::Table => output::render_list(
            &[
                DfRow("Images", usage.images),
                DfRow("Machines", usage.machines),
            ],
            format,
            false,
        ),
        other => output::render_value(usage, other),
    }
}

fn absolute(path: &str) -> anyhow::Result<String> {
    Ok(std::path::absolute(path)?.display().to_string())
}

impl SystemCommand {
    /// Runs the subcommand; the exit code is `check`'s verdict, 0 for the others.
    pub async fn run(self) -> anyhow::Result<u8> {
        match self {
            SystemCommand::Start if systemd::manages_service() => start_unit().await?,
            SystemCommand::Start => {
                if service::start().await? {
                    println!("container service started");
                } else {
                    println!("container service already running");
                }
            }
            SystemCommand::Stop if systemd::manages_service() && is_root() => {
                systemd::systemctl("stop", &[systemd::UNIT])?;
                println!(
                    "container service stopped ({} keeps listening: the next command starts it again; `systemctl stop {}` keeps it down)",
                    systemd::SOCKET_UNIT,
                    systemd::SOCKET_UNIT
                );
            }
            SystemCommand::Stop => {
                let client = Client::new(paths::socket());
                match client
                    .call_raw::<()>(hyper::Method::POST, "/system/shutdown", None)
                    .await
                {
                    Ok(_) => {
                        // Wait until the socket is gone so a following `start` is clean.
                        for _ in 0..200 {
                            if client.get::<SystemStatus>("/system/status").await.is_err() {
                                break;
                            }
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        }
                        println!("container service stopped");
                    }
                    Err(ClientError::NotRunning { .. }) => {
                        println!("container service is not running")
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            SystemCommand::Status(f) => {
                let client = Client::new(paths::socket());
                match client.get::<SystemStatus>("/system/status").await {
                    Ok(status) => print!("{}", render_status(&status, f.format)?),
                    Err(ClientError::NotRunning { socket, .. }) => {
                        return Err(failed(
                            ExitCode::ServiceUnavailable,
                            format!(
                                "the container service is not running (no answer on {}); start it with `{}`",
                                socket.display(),
                                if systemd::manages_service() {
                                    format!("sudo systemctl start {}", systemd::UNIT)
                                } else {
                                    "sudo container system start".to_string()
                                }
                            ),
                        ));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            SystemCommand::Df(f) => {
                let client = service::connect().await?;
                let usage: DiskUsage = client.get("/system/df").await?;
                print!("{}", render_df(&usage, f.format)?);
            }
            SystemCommand::Events(args) => {
                let client = service::connect().await?;
                super::events::run(&client, args).await?;
            }
            SystemCommand::Check(args) => return super::check::run(args).await,
            SystemCommand::Logs { follow } if systemd::manages_service() => {
                systemd::journal(follow)?
            }
            SystemCommand::Logs { follow } => {
                let log = service::log_file();
                let mut args = vec!["-n", "+1"];
                if follow {
                    args.push("-F");
                }
                let status = std::process::Command::new("tail")
                    .args(&args)
                    .arg(&log)
                    .status()?;
                if !status.success() {
                    anyhow::bail!("cannot read the service log {}", log.display());
                }
            }
            SystemCommand::Property(PropertyCommand::List(f)) => {
                let client = service::connect().await?;
                let props: Vec<Property> = client.get("/system/properties").await?;
                print!("{}", output::render_list(&props, f.format, false)?);
            }
            SystemCommand::Kernel(KernelCommand::Set {
                binary,
                modules,
                recommended,
                quiet,
            }) => {
                let client = service::connect().await?;
                let request = KernelSetRequest {
                    binary: binary.as_deref().map(absolute).transpose()?,
                    modules: modules.as_deref().map(absolute).transpose()?,
                    recommended,
                };
                let spinner = crate::progress::spinner(
                    if recommended {
                        "downloading and installing the recommended kernel".into()
                    } else {
                        "installing the kernel".into()
                    },
                    quiet,
                );
                let kernel = client
                    .post::<_, container_api::system::KernelInfo>("/system/kernel", &request)
                    .await;
                crate::progress::done(spinner);
                let kernel = kernel?;
                println!("kernel {} installed ({})", kernel.version, kernel.path);
            }
        }
        Ok(0)
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `system start` when systemd manages the service: root starts the units; anyone else's
/// first connection starts it through the socket unit.
async fn start_unit() -> anyhow::Result<()> {
    let client = Client::new(paths::socket());
    if client.get::<SystemStatus>("/system/status").await.is_ok() {
        println!(
            "container service already running (systemd unit {})",
            systemd::UNIT
        );
        return Ok(());
    }
    if !is_root() {
        return Err(failed(
            ExitCode::ServiceUnavailable,
            format!(
                "the container service is not running and its socket unit does not answer; start it with `sudo systemctl start {} {}`",
                systemd::SOCKET_UNIT,
                systemd::UNIT
            ),
        ));
    }
    systemd::systemctl("start", &[systemd::SOCKET_UNIT, systemd::UNIT])?;
    for _ in 0..400 {
        if client.get::<SystemStatus>("/system/status").await.is_ok() {
            println!("container service started (systemd unit {})", systemd::UNIT);
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    Err(failed(
        ExitCode::ServiceUnavailable,
        format!(
            "systemd started {} but it did not answer within 20 s; see `journalctl -u {}`",
            systemd::UNIT,
            systemd::UNIT
        ),
    ))
}

fn render_status(status: &SystemStatus, format: Format) -> anyhow::Result<String> {
    if format != Format::Table {
        return output::render_value(status, format);
    }
    let kernel = status
        .kernel
        .as_ref()
        .map(|k| format!("{} ({})", k.version, k.path))
        .unwrap_or_else(|| "none (run `container system kernel set --recommended`)".into());
    let run_by = match status.run_by.as_str() {
        "" => "unknown (an older service)",
        r => r,
    };
    Ok(format!(
        "status:          {}\nrun by:          {}\nversion:         {}\npid:             {}\nroot:            {}\nsocket:          {}\nstarted:         {}\nvirtualization:  {}\nkernel:          {}\nimages:          {}\nmachines:        {} ({} running)\n",
        status.status,
        run_by,
        status.version,
        status.pid,
        status.root,
        status.socket,
        status.started.format("%Y-%m-%d %H:%M:%S UTC"),
        status.virtualization,
        kernel,
        status.images,
        status.machines,
        status.machines_running,
    ))
}
