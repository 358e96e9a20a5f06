//! `container machine set-default`: the machine commands act on when given no name.

use clap::Args;
use container_api::Client;
use container_api::machine::Machine;

#[derive(Debug, Args)]
pub struct SetDefaultArgs {
    name: String,
}

pub async fn run(client: &Client, args: SetDefaultArgs) -> anyhow::Result<()> {
    let m: Machine = client
        .post(
            &format!("/machines/{}/default", args.name),
            &serde_json::json!({}),
        )
        .await?;
    println!("{}", m.id);
    Ok(())
}
