//! `container image tag`: another reference to an image in the store.

use clap::Args;
use container_api::Client;
use container_api::image::{ImageSummary, TagRequest};

#[derive(Debug, Args)]
pub struct TagArgs {
    source: String,
    target: String,
    /// Publish TARGET as a system-wide image, which every user can use (root only).
    #[arg(long)]
    system: bool,
}

pub async fn run(client: &Client, args: TagArgs) -> anyhow::Result<()> {
    let image: ImageSummary = client
        .post(
            "/images/tag",
            &TagRequest {
                source: args.source,
                target: args.target,
                system: args.system,
            },
        )
        .await?;
    println!("{}", image.reference);
    Ok(())
}
