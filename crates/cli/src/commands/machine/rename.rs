//! `container machine rename`: a stopped machine's new name.

use clap::Args;
use container_api::Client;
use container_api::machine::{Machine, RenameRequest};

/// What `--help` says beyond the one line (on the subcommand, which would hide it here).
pub const LONG_ABOUT: &str = "Give a stopped machine a new name (and host name at its next start). Its disk, \
snapshots and settings stay; if it was your default machine, it still is.";

#[derive(Debug, Args)]
pub struct RenameArgs {
    /// The machine's current name.
    old: String,
    /// Its new name.
    new: String,
}

pub async fn run(client: &Client, args: RenameArgs) -> anyhow::Result<()> {
    let m: Machine = client
        .post(
            &format!("/machines/{}/rename", args.old),
            &RenameRequest { name: args.new },
        )
        .await?;
    println!("{}", m.id);
    Ok(())
}
