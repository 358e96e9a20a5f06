//! `container image prune`: with `--all`, removes your images no machine of yours was
//! created from, and says how much disk that gave back.

use clap::Args;
use container_api::Client;
use container_api::image::RemoveReport;
use container_api::size::format_size;

use crate::output::{self, Format};

#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Remove every image of yours that none of your machines was created from. Without it
    /// nothing goes: an image without a name is deleted as soon as its last name is.
    #[arg(short, long)]
    all: bool,
    /// Prune the system-wide names instead of your own (root only).
    #[arg(long)]
    system: bool,
    /// `json` (or `yaml`, `toml`): the names untagged, the blobs deleted and the bytes freed.
    #[arg(long, value_enum, default_value_t)]
    format: Format,
}

pub async fn run(client: &Client, args: PruneArgs) -> anyhow::Result<()> {
    let report: RemoveReport = client
        .post(
            &format!(
                "/images/prune?{}",
                super::query(&[
                    ("all", super::flag(args.all)),
                    ("system", super::flag(args.system)),
                ])
            ),
            &serde_json::json!({}),
        )
        .await?;
    if args.format != Format::Table {
        print!("{}", output::render_value(&report, args.format)?);
        return Ok(());
    }
    for u in &report.untagged {
        println!("Untagged: {u}");
    }
    for d in &report.deleted {
        println!("Deleted: {d}");
    }
    println!(
        "Reclaimed {} of disk space",
        format_size(report.freed_bytes)
    );
    Ok(())
}
