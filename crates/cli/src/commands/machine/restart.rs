//! `container machine restart`: stop (with `stop`'s flags), then start.

use clap::Args;
use container_api::Client;
use container_api::machine::{Machine, StopRequest};

#[derive(Debug, Args)]
pub struct RestartArgs {
    /// Signal for the machine's init (default: the image's or the init's own).
    #[arg(short, long)]
    signal: Option<String>,
    /// Seconds to wait before the VM is forced off.
    #[arg(short, long)]
    time: Option<u64>,
    /// Machines to restart (default: the default machine).
    names: Vec<String>,
}

pub async fn run(client: &Client, args: RestartArgs) -> anyhow::Result<()> {
    let names = if args.names.is_empty() {
        vec![super::resolve_name(client, None).await?]
    } else {
        args.names
    };
    let request = StopRequest {
        signal: args.signal,
        timeout_secs: args.time,
    };
    for n in names {
        let _: Machine = client
            .post(&format!("/machines/{n}/stop"), &request)
            .await?;
        let m: Machine = client
            .post(&format!("/machines/{n}/start"), &serde_json::json!({}))
            .await?;
        println!("{}", m.id);
    }
    Ok(())
}
