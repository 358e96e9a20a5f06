//! `container image inspect`: everything about images, as a document.

use clap::Args;
use container_api::Client;
use container_api::image::ImageDetail;

use crate::output::{self, Format};

#[derive(Debug, Args)]
pub struct InspectArgs {
    #[arg(required = true)]
    references: Vec<String>,
    #[arg(long, value_enum, default_value_t = Format::Json)]
    format: Format,
}

pub async fn run(client: &Client, args: InspectArgs) -> anyhow::Result<()> {
    let mut details = Vec::new();
    for r in &args.references {
        let d: ImageDetail = client
            .get(&format!(
                "/images/inspect?{}",
                super::query(&[("reference", r)])
            ))
            .await?;
        details.push(d);
    }
    print!("{}", output::render_value(&details, args.format)?);
    Ok(())
}
