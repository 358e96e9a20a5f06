//! `container machine start`: boot a machine without running anything in it.

use clap::Args;
use container_api::Client;
use container_api::machine::Machine;

#[derive(Debug, Args)]
pub struct StartArgs {
    /// Machine name (default: the default machine).
    name: Option<String>,
    /// No progress, only the name and errors.
    #[arg(short, long)]
    quiet: bool,
    /// Return once the image's init has finished booting (systemd `running` or `degraded`,
    /// OpenRC's default runlevel), not as soon as commands can run.
    #[arg(long)]
    wait: bool,
}

pub async fn run(client: &Client, args: StartArgs) -> anyhow::Result<()> {
    let name = super::resolve_name(client, args.name).await?;
    let spinner = crate::progress::spinner(format!("booting {name}"), args.quiet);
    let m = client
        .post::<_, Machine>(&format!("/machines/{name}/start"), &serde_json::json!({}))
        .await;
    let m = match (m, args.wait) {
        (Ok(m), true) => super::wait_until_booted(client, &name).await.map(|_| m),
        (m, _) => m.map_err(Into::into),
    };
    crate::progress::done(spinner);
    println!("{}", m?.id);
    Ok(())
}
