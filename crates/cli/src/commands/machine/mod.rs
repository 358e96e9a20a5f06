//! `container machine …` (alias `m`): persistent machines. Simple subcommands live here; `run`
//! and `cp`, which stream, have files of their own.

mod cp;
mod run;

use clap::{Args, Subcommand};
use container_api::client::ClientError;
use container_api::machine::{
    CreateRequest, HomeMount, Machine, MountSpec, SetReply, SetRequest, StopRequest,
};
use container_api::size::{format_size, parse_size};
use container_api::{Client, ErrorKind};

use crate::output::{self, Format, Tabular};
use crate::service;

#[derive(Debug, Subcommand)]
pub enum MachineCommand {
    /// Create a machine from an image (pulled if absent) and boot it.
    Create(CreateArgs),
    /// Run a command in a machine (booting it if needed); no command: a login shell.
    Run(run::RunArgs),
    /// Boot a machine without running anything.
    Start {
        /// Machine name (default: the default machine).
        name: Option<String>,
    },
    /// List machines.
    #[command(visible_alias = "ls")]
    List {
        #[arg(long, value_enum, default_value_t)]
        format: Format,
        /// Print names only.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Show everything about machines.
    Inspect {
        /// Machine names (default: the default machine).
        names: Vec<String>,
        #[arg(long, value_enum, default_value_t = Format::Json)]
        format: Format,
    },
    /// Change settings: cpus, memory, disk-size (grow only), home-mount, kernel.
    Set {
        #[arg(short, long)]
        name: Option<String>,
        /// KEY=VALUE pairs.
        #[arg(required = true, value_name = "KEY=VALUE")]
        settings: Vec<String>,
    },
    /// Make a machine the default for commands that take no name.
    SetDefault { name: String },
    /// Show a machine's console output (its init), or with --boot the boot log.
    Logs {
        /// The boot log: kernel and agent.
        #[arg(long)]
        boot: bool,
        /// Keep printing new output.
        #[arg(short, long)]
        follow: bool,
        /// Only the last LINES lines.
        #[arg(short = 'n', long = "lines")]
        lines: Option<usize>,
        name: Option<String>,
    },
    /// Shut machines down cleanly through their init (forced after the timeout).
    Stop {
        /// Signal for the machine's init (default: the image's or the init's own).
        #[arg(short, long)]
        signal: Option<String>,
        /// Seconds to wait before the VM is forced off.
        #[arg(short, long)]
        time: Option<u64>,
        names: Vec<String>,
    },
    /// Delete machines and their disks.
    #[command(visible_alias = "rm")]
    Delete {
        /// Stop running machines first.
        #[arg(short, long)]
        force: bool,
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Copy files between the host and a machine (`NAME:/path` on one side).
    Cp(cp::CpArgs),
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The image, e.g. `127.0.0.1:5000/debian:12`.
    image: String,
    /// Machine name (default: derived from the image, `alpine:latest` → `alpine-latest`).
    #[arg(short, long)]
    name: Option<String>,
    /// Make it the default machine.
    #[arg(long)]
    set_default: bool,
    /// Create without booting.
    #[arg(long)]
    no_boot: bool,
    #[arg(long)]
    cpus: Option<u32>,
    /// Memory, e.g. 2G (default: half the host's).
    #[arg(long, value_parser = parse_size)]
    memory: Option<u64>,
    /// Virtual disk size, e.g. 64G.
    #[arg(long, value_parser = parse_size)]
    disk_size: Option<u64>,
    /// How your home directory is shared: rw, ro or none.
    #[arg(long)]
    home_mount: Option<HomeMount>,
    /// Share another host directory: HOST:GUEST[:ro]. Repeatable.
    #[arg(long = "mount", value_name = "HOST:GUEST[:ro]", value_parser = parse_mount)]
    mounts: Vec<MountSpec>,
    /// `none` for a machine with only loopback networking.
    #[arg(long)]
    network: Option<String>,
    /// A kernel image to boot instead of the system's.
    #[arg(long)]
    kernel: Option<String>,
}

fn parse_mount(text: &str) -> Result<MountSpec, String> {
    let parts: Vec<&str> = text.split(':').collect();
    let (host, guest, read_only) = match parts.as_slice() {
        [h, g] => (*h, *g, false),
        [h, g, "ro"] => (*h, *g, true),
        [h, g, "rw"] => (*h, *g, false),
        _ => return Err(format!("invalid mount `{text}`: expected HOST:GUEST[:ro]")),
    };
    if !guest.starts_with('/') {
        return Err(format!(
            "invalid mount `{text}`: the guest path must be absolute"
        ));
    }
    let host = std::path::absolute(host)
        .map_err(|e| format!("invalid mount `{text}`: {e}"))?
        .display()
        .to_string();
    Ok(MountSpec {
        host_path: host,
        guest_path: guest.to_string(),
        read_only,
    })
}

impl Tabular for Machine {
    fn headers() -> Vec<&'static str> {
        vec![
            "NAME", "IMAGE", "CREATED", "IP", "CPUS", "MEMORY", "DISK", "STATE", "DEFAULT",
        ]
    }
    fn row(&self) -> Vec<String> {
        vec![
            self.name.clone(),
            self.image.clone(),
            self.created
                .with_timezone(&chrono::Local)
                .format("%Y-%m-%d %H:%M:%S")
                .to_string(),
            self.ip_address.clone().unwrap_or_else(|| "-".into()),
            self.cpus.to_string(),
            format_size(self.memory),
            format_size(self.disk_allocated),
            self.state.to_string(),
            if self.default {
                "*".into()
            } else {
                String::new()
            },
        ]
    }
    fn id(&self) -> String {
        self.name.clone()
    }
}

/// The machine a command without a name acts on.
pub async fn resolve_name(client: &Client, name: Option<String>) -> anyhow::Result<String> {
    if let Some(n) = name {
        return Ok(n);
    }
    let machines: Vec<Machine> = client.get("/machines").await?;
    machines
        .into_iter()
        .find(|m| m.default)
        .map(|m| m.name)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no machine name given and there is no default machine; create one with `container machine create IMAGE` or pick one with `container machine set-default NAME`"
            )
        })
}

/// Pulls the image when the store does not have it, with progress.
async fn ensure_image(client: &Client, image: &str) -> anyhow::Result<()> {
    let path = format!(
        "/images/inspect?{}",
        serde_urlencoded::to_string([("reference", image)]).expect("encodes")
    );
    match client.get::<serde_json::Value>(&path).await {
        Ok(_) => Ok(()),
        Err(ClientError::Api(e)) if e.kind == ErrorKind::NotFound => {
            super::image::pull(client, image, false).await.map(|_| ())
        }
        Err(e) => Err(e.into()),
    }
}

impl MachineCommand {
    pub async fn run(self) -> anyhow::Result<u8> {
        let client = service::connect().await?;
        match self {
            MachineCommand::Create(a) => {
                ensure_image(&client, &a.image).await?;
                let request = CreateRequest {
                    image: a.image,
                    name: a.name,
                    set_default: a.set_default,
                    no_boot: a.no_boot,
                    cpus: a.cpus,
                    memory: a.memory,
                    disk_size: a.disk_size,
                    home_mount: a.home_mount,
                    mounts: a.mounts,
                    network: a.network,
                    kernel: a
                        .kernel
                        .map(|k| std::path::absolute(k).map(|p| p.display().to_string()))
                        .transpose()?,
                };
                let machine: Machine = client.post("/machines", &request).await?;
                println!("{}", machine.name);
            }
            MachineCommand::Run(args) => return run::run(&client, args).await,
            MachineCommand::Start { name } => {
                let name = resolve_name(&client, name).await?;
                let m: Machine = client
                    .post(&format!("/machines/{name}/start"), &serde_json::json!({}))
                    .await?;
                println!("{}", m.name);
            }
            MachineCommand::List { format, quiet } => {
                let machines: Vec<Machine> = client.get("/machines").await?;
                print!("{}", output::render_list(&machines, format, quiet)?);
            }
            MachineCommand::Inspect { names, format } => {
                let names = if names.is_empty() {
                    vec![resolve_name(&client, None).await?]
                } else {
                    names
                };
                let mut machines = Vec::new();
                for n in names {
                    let m: Machine = client.get(&format!("/machines/{n}")).await?;
                    machines.push(m);
                }
                print!("{}", output::render_value(&machines, format)?);
            }
            MachineCommand::Set { name, settings } => {
                let name = resolve_name(&client, name).await?;
                let request = SetRequest::parse(&settings).map_err(anyhow::Error::msg)?;
                let reply: SetReply = client
                    .post(&format!("/machines/{name}/set"), &request)
                    .await?;
                if reply.takes_effect_at_next_start {
                    eprintln!("Note: changes take effect after stopping and starting '{name}'.");
                }
                println!("{}", reply.machine.name);
            }
            MachineCommand::SetDefault { name } => {
                let m: Machine = client
                    .post(&format!("/machines/{name}/default"), &serde_json::json!({}))
                    .await?;
                println!("{}", m.name);
            }
            MachineCommand::Logs {
                boot,
                follow,
                lines,
                name,
            } => {
                let name = resolve_name(&client, name).await?;
                let mut query = vec![("boot", boot.to_string()), ("follow", follow.to_string())];
                if let Some(n) = lines {
                    query.push(("lines", n.to_string()));
                }
                let path = format!(
                    "/machines/{name}/logs?{}",
                    serde_urlencoded::to_string(&query).expect("encodes")
                );
                let response = client
                    .call_raw::<()>(hyper::Method::GET, &path, None)
                    .await?;
                let mut stream = Box::pin(container_api::client::body_stream(response));
                use futures::StreamExt;
                use std::io::Write;
                let mut out = std::io::stdout();
                while let Some(chunk) = stream.next().await {
                    out.write_all(&chunk?)?;
                    out.flush()?;
                }
            }
            MachineCommand::Stop {
                signal,
                time,
                names,
            } => {
                let names = if names.is_empty() {
                    vec![resolve_name(&client, None).await?]
                } else {
                    names
                };
                let request = StopRequest {
                    signal,
                    timeout_secs: time,
                };
                for n in names {
                    let m: Machine = client
                        .post(&format!("/machines/{n}/stop"), &request)
                        .await?;
                    println!("{}", m.name);
                }
            }
            MachineCommand::Delete { force, names } => {
                for n in names {
                    let m: Machine = client
                        .delete(&format!("/machines/{n}?force={force}"))
                        .await?;
                    if m.default {
                        eprintln!(
                            "Deleted the default machine '{n}'. Pick a new one with `container machine set-default NAME`."
                        );
                    }
                    println!("{}", m.name);
                }
            }
            MachineCommand::Cp(args) => cp::run(&client, args).await?,
        }
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::parse_mount;

    #[test]
    fn mounts_parse_with_optional_ro() {
        let m = parse_mount("/srv/data:/data:ro").unwrap();
        assert_eq!(
            (m.host_path.as_str(), m.guest_path.as_str(), m.read_only),
            ("/srv/data", "/data", true)
        );
        assert!(!parse_mount("/a:/b").unwrap().read_only);
        assert!(parse_mount("/a").unwrap_err().contains("HOST:GUEST"));
        assert!(parse_mount("/a:rel").unwrap_err().contains("absolute"));
        assert!(parse_mount("/a:/b:rx").is_err());
    }
}
