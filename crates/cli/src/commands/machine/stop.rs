//! `container machine stop`: shut machines down cleanly through their init, forced off after
//! the timeout.

use clap::Args;
use container_api::Client;
use container_api::machine::{Machine, StopRequest};

#[derive(Debug, Args)]
pub struct StopArgs {
    /// Signal for the machine's init (default: the image's or the init's own).
    #[arg(short, long)]
    signal: Option<String>,
    /// Seconds to wait before the VM is forced off.
    #[arg(short, long, conflicts_with = "force")]
    time: Option<u64>,
    /// Force the VM off at once, without waiting for its init (for an unresponsive machine).
    #[arg(short, long)]
    force: bool,
    names: Vec<String>,
}

pub async fn run(client: &Client, args: StopArgs) -> anyhow::Result<()> {
    let names = if args.names.is_empty() {
        vec![super::resolve_name(client, None).await?]
    } else {
        args.names
    };
    let request = StopRequest {
        signal: args.signal,
        timeout_secs: match args.force {
            true => Some(0),
            false => args.time,
        },
    };
    for n in names {
        let m: Machine = client
            .post(&format!("/machines/{n}/stop"), &request)
            .await?;
        println!("{}", m.id);
    }
    Ok(())
}
