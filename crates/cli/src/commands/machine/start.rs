//! `container machine start`: boot a machine without running anything in it.

use clap::Args;
use container_api::Client;
use container_api::machine::Machine;

#[derive(Debug, Args)]
pub struct StartArgs {
    /// Machine name (default: the default machine).
    name: Option<String>,
}

pub async fn run(client: &Client, args: StartArgs) -> anyhow::Result<()> {
    let name = super::resolve_name(client, args.name).await?;
    let m: Machine = client
        .post(&format!("/machines/{name}/start"), &serde_json::json!({}))
        .await?;
    println!("{}", m.id);
    Ok(())
}
