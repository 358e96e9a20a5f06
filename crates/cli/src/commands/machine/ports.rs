//! `container machine ports`: the host ports forwarded to a machine, each with its guest port
//! and whether the host has it (forwarded) or not (refused, and why).

use clap::Args;
use container_api::Client;
use container_api::ports::PortForward;

use crate::output::{self, Format, Tabular};

#[derive(Debug, Args)]
#[command(after_help = "\
A running machine's listening TCP ports (on a wildcard or loopback address in the guest) are \
forwarded from the same port on the host's 127.0.0.1 (and ::1), ports below 1024 from 10000 + \
PORT, and so are the ports published with `machine create --publish HOST:GUEST`. A host port \
something else already listens on is never taken: it shows as refused, and is forwarded once it \
is free. Turn the automatic part off with `container machine set -n NAME forward-ports=off`.")]
pub struct PortsArgs {
    /// The machine (default: the default machine).
    name: Option<String>,
    #[arg(long, value_enum, default_value_t)]
    format: Format,
    /// Print only the host addresses (ADDRESS:PORT) forwarded.
    #[arg(short, long)]
    quiet: bool,
}

impl Tabular for PortForward {
    fn headers() -> Vec<&'static str> {
        vec!["GUEST PORT", "HOST", "STATE"]
    }
    fn row(&self) -> Vec<String> {
        let state = match &self.reason {
            Some(reason) => format!("{}: {reason}", self.state),
            None => self.state.to_string(),
        };
        let guest = match self.published {
            true => format!("{} (published)", self.guest_port),
            false => self.guest_port.to_string(),
        };
        vec![guest, self.id(), state]
    }
    fn id(&self) -> String {
        match self.host_address.contains(':') {
            true => format!("[{}]:{}", self.host_address, self.host_port),
            false => format!("{}:{}", self.host_address, self.host_port),
        }
    }
}

pub async fn run(client: &Client, args: PortsArgs) -> anyhow::Result<()> {
    let name = super::resolve_name(client, args.name).await?;
    let ports: Vec<PortForward> = client.get(&format!("/machines/{name}/ports")).await?;
    let shown: Vec<PortForward> = match args.quiet {
        true => ports
            .into_iter()
            .filter(|p| p.state == container_api::ports::PortState::Forwarded)
            .collect(),
        false => ports,
    };
    print!("{}", output::render_list(&shown, args.format, args.quiet)?);
    Ok(())
}
