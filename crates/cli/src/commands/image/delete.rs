//! `container image delete` (alias `rm`): references, and the blobs and base disks nothing
//! else uses.

use clap::Args;
use container_api::Client;
use container_api::image::RemoveReport;

#[derive(Debug, Args)]
pub struct DeleteArgs {
    #[arg(required = true)]
    references: Vec<String>,
    /// Remove even when a machine was created from the image (the machine keeps working).
    #[arg(short, long)]
    force: bool,
    /// Remove system-wide names (root only).
    #[arg(long)]
    system: bool,
}

pub async fn run(client: &Client, args: DeleteArgs) -> anyhow::Result<()> {
    for r in &args.references {
        let report: RemoveReport = client
            .delete(&format!(
                "/images?{}",
                super::query(&[
                    ("reference", r),
                    ("force", super::flag(args.force)),
                    ("system", super::flag(args.system)),
                ])
            ))
            .await?;
        for u in &report.untagged {
            println!("Untagged: {u}");
        }
        for d in &report.deleted {
            println!("Deleted: {d}");
        }
    }
    Ok(())
}
