//! `container image load`: images from an OCI image-layout or `docker save` tar archive, read
//! from a file or standard input and streamed to the service.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use container_api::Client;
use container_api::client;
use container_api::image::ImageSummary;

#[derive(Debug, Args)]
pub struct LoadArgs {
    /// The archive (default: standard input).
    #[arg(short, long)]
    input: Option<PathBuf>,
    /// Name them as system-wide images (root only).
    #[arg(long)]
    system: bool,
}

pub async fn run(client: &Client, args: LoadArgs) -> anyhow::Result<()> {
    let body = match &args.input {
        Some(path) => {
            let file = tokio::fs::File::open(path)
                .await
                .with_context(|| format!("opening {}", path.display()))?;
            client::stream_body(tokio_util::io::ReaderStream::new(file))
        }
        None => client::stream_body(tokio_util::io::ReaderStream::new(tokio::io::stdin())),
    };
    let path = match args.system {
        true => "/images/load?system=true",
        false => "/images/load",
    };
    let images: Vec<ImageSummary> = client.upload(path, body).await?;
    for i in images {
        println!("Loaded image: {}", i.reference);
    }
    Ok(())
}
