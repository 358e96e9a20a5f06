//! `container machine clone`: a new machine from another's disk and settings.

use clap::Args;
use container_api::Client;
use container_api::machine::{CloneRequest, Machine};

/// What `--help` says beyond the one line (on the subcommand, which would hide it here).
pub const LONG_ABOUT: &str = "Make a new machine with the disk content and settings of SOURCE: its own name, \
address, machine-id and hostname, and the machine user set up again at its first start. \
From a stopped machine it takes the same time whatever the disk holds (both share the \
disk as it was, each writing its own overlay); a running machine keeps running, its \
filesystem frozen for the instant the copy is taken. The new machine is left stopped. \
Files in your host home are shared, not on the disk, and are not copied.";

#[derive(Debug, Args)]
pub struct CloneArgs {
    /// The machine to copy.
    source: String,
    /// The new machine's name.
    name: String,
}

pub async fn run(client: &Client, args: CloneArgs) -> anyhow::Result<()> {
    let m: Machine = client
        .post(
            &format!("/machines/{}/clone", args.source),
            &CloneRequest { name: args.name },
        )
        .await?;
    println!("{}", m.id);
    Ok(())
}
