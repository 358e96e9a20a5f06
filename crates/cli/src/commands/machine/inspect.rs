//! `container machine inspect`: everything about machines, as a document.

use clap::Args;
use container_api::Client;
use container_api::machine::Machine;

use crate::output::{self, Format};

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Machine names (default: the default machine).
    names: Vec<String>,
    #[arg(long, value_enum, default_value_t = Format::Json)]
    format: Format,
}

pub async fn run(client: &Client, args: InspectArgs) -> anyhow::Result<()> {
    let names = if args.names.is_empty() {
        vec![super::resolve_name(client, None).await?]
    } else {
        args.names
    };
    let mut machines = Vec::new();
    for n in names {
        let m: Machine = client.get(&format!("/machines/{n}")).await?;
        machines.push(m);
    }
    print!("{}", output::render_value(&machines, args.format)?);
    Ok(())
}
