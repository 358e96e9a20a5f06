//! `container machine delete` (alias `rm`): machines and their disks.

use clap::Args;
use container_api::Client;
use container_api::machine::Machine;

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Stop running machines first.
    #[arg(short, long)]
    force: bool,
    #[arg(required = true)]
    names: Vec<String>,
}

pub async fn run(client: &Client, args: DeleteArgs) -> anyhow::Result<()> {
    for n in args.names {
        let m: Machine = client
            .delete(&format!("/machines/{n}?force={}", args.force))
            .await?;
        if m.default {
            eprintln!(
                "Deleted the default machine '{n}'. Pick a new one with `container machine set-default NAME`."
            );
        }
        println!("{}", m.id);
    }
    Ok(())
}
