//! `container machine set`: change a machine's settings from `KEY=VALUE` pairs; the service
//! says whether they wait for the next start.

use clap::Args;
use container_api::machine::{SetReply, SetRequest};
use container_api::{Client, ExitCode};

use crate::exit::failed;

#[derive(Debug, Args)]
pub struct SetArgs {
    #[arg(short, long)]
    name: Option<String>,
    /// KEY=VALUE pairs.
    #[arg(required = true, value_name = "KEY=VALUE")]
    settings: Vec<String>,
}

pub async fn run(client: &Client, args: SetArgs) -> anyhow::Result<()> {
    let name = super::resolve_name(client, args.name).await?;
    let request = SetRequest::parse(&args.settings).map_err(|e| failed(ExitCode::Usage, e))?;
    let reply: SetReply = client
        .post(&format!("/machines/{name}/set"), &request)
        .await?;
    if reply.takes_effect_at_next_start {
        eprintln!("Note: changes will take effect after stopping and starting '{name}'.");
    }
    println!("{}", reply.machine.id);
    Ok(())
}
