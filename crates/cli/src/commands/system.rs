//! `container system …`: start, stop and inspect the service; configuration; kernel.

use clap::{Args, Subcommand};
use container_api::system::{KernelSetRequest, Property, SystemStatus};
use container_api::{Client, ExitCode, client::ClientError, paths};

use crate::exit::failed;
use crate::output::{self, Format, Tabular};
use crate::service;

#[derive(Debug, Subcommand)]
pub enum SystemCommand {
    /// Start the service (machines it ran before are re-adopted).
    Start,
    /// Stop the service; running machines keep running.
    Stop,
    /// Show whether the service runs, and with what.
    Status(FormatArg),
    /// Stream your machines' lifecycle events (`--format json`: one JSON object a line).
    Events(super::events::EventsArgs),
    /// Show the service's log.
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

fn absolute(path: &str) -> anyhow::Result<String> {
    Ok(std::path::absolute(path)?.display().to_string())
}

impl SystemCommand {
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            SystemCommand::Start => {
                if service::start().await? {
                    println!("container service started");
                } else {
                    println!("container service already running");
                }
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
                                "the container service is not running (no answer on {}); start it with `container system start`",
                                socket.display()
                            ),
                        ));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            SystemCommand::Events(args) => {
                let client = service::connect().await?;
                super::events::run(&client, args).await?;
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
        Ok(())
    }
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
    Ok(format!(
        "status:          {}\nversion:         {}\npid:             {}\nroot:            {}\nsocket:          {}\nstarted:         {}\nvirtualization:  {}\nkernel:          {}\nimages:          {}\nmachines:        {} ({} running)\n",
        status.status,
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
