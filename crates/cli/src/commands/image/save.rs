//! `container image save`: images as one OCI image-layout tar archive, to a file (written
//! aside and renamed) or to standard output when it is not a terminal.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use container_api::client;
use container_api::{Client, ExitCode};
use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use crate::exit::failed;

#[derive(Debug, Args)]
pub struct SaveArgs {
    #[arg(required = true)]
    references: Vec<String>,
    /// The archive to write (default: standard output).
    #[arg(short, long)]
    output: Option<PathBuf>,
}

pub async fn run(client: &Client, args: SaveArgs) -> anyhow::Result<()> {
    if args.output.is_none() && std::io::stdout().is_terminal() {
        return Err(failed(
            ExitCode::Usage,
            "refusing to write an archive to a terminal; use -o FILE or redirect standard output",
        ));
    }
    let pairs: Vec<(&str, &str)> = args
        .references
        .iter()
        .map(|r| ("reference", r.as_str()))
        .collect();
    let response = client
        .call_raw::<()>(
            hyper::Method::GET,
            &format!("/images/save?{}", super::query(&pairs)),
            None,
        )
        .await?;
    let mut stream = Box::pin(client::body_stream(response));
    match &args.output {
        Some(path) => {
            // Written beside the target and renamed, so a failed save leaves no truncated
            // archive behind.
            let tmp = path.with_extension("partial");
            let mut file = tokio::fs::File::create(&tmp)
                .await
                .with_context(|| format!("creating {}", tmp.display()))?;
            while let Some(chunk) = stream.next().await {
                file.write_all(&chunk?).await?;
            }
            file.sync_all().await?;
            tokio::fs::rename(&tmp, path).await?;
        }
        None => {
            let mut out = tokio::io::stdout();
            while let Some(chunk) = stream.next().await {
                out.write_all(&chunk?).await?;
            }
            out.flush().await?;
        }
    }
    Ok(())
}
