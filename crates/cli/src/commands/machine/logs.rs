//! `container machine logs`: a machine's console output (its init) or boot log, streamed as
//! the service sends it.

use std::io::Write;

use clap::Args;
use container_api::Client;
use futures::StreamExt;

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The boot log: kernel and agent.
    #[arg(long)]
    boot: bool,
    /// Keep printing new output.
    #[arg(short, long)]
    follow: bool,
    /// Only the last LINES lines.
    #[arg(short = 'n', long = "lines")]
    lines: Option<usize>,
    name: Option<String>,
}

pub async fn run(client: &Client, args: LogsArgs) -> anyhow::Result<()> {
    let name = super::resolve_name(client, args.name).await?;
    let mut query = vec![
        ("boot", args.boot.to_string()),
        ("follow", args.follow.to_string()),
    ];
    if let Some(n) = args.lines {
        query.push(("lines", n.to_string()));
    }
    let path = format!(
        "/machines/{name}/logs?{}",
        serde_urlencoded::to_string(&query).expect("encodes")
    );
    let response = client
        .call_raw::<()>(hyper::Method::GET, &path, None)
        .await?;
    let mut stream = Box::pin(container_api::client::body_stream(response));
    let mut out = std::io::stdout();
    while let Some(chunk) = stream.next().await {
        out.write_all(&chunk?)?;
        out.flush()?;
    }
    Ok(())
}
