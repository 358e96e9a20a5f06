//! `container machine commit`: an image of a machine's filesystem, among your images.

use clap::Args;
use container_api::Client;
use container_api::image::ImageSummary;
use container_api::machine::CommitRequest;

use crate::output::{Format, render_value};

/// What `--help` says beyond the one line (on the subcommand, which would hide it here).
pub const LONG_ABOUT: &str = "Make an image of NAME's filesystem, named IMAGE among your images \
(replacing your image of that name, never another user's or a system-wide one). The image \
keeps the config of the machine's image (environment, entrypoint, command, labels, stop \
signal), gains the labels org.container.machine.source (NAME), org.container.machine.base \
(its image's digest) and org.container.machine.base.name, and has one layer: the machine's \
whole root filesystem. Not in it: the contents of /proc, /sys, /dev, /run and /tmp, and \
anything mounted (your host home, --mount directories). A stopped machine is started \
first; a running one keeps running, and a file written while the commit runs may be \
caught half-written. A machine made from the image sets its own user up at its first \
start, as a clone does; the committing user's account stays in the image. Share the image \
with `container image push`.";

#[derive(Debug, Args)]
pub struct CommitArgs {
    /// The machine.
    name: String,
    /// The image's name, e.g. `127.0.0.1:5000/me/dev:1` (to push it there later).
    image: String,
    /// Output format of the image: `table` prints its reference, the others its summary.
    #[arg(long, value_enum, default_value_t)]
    format: Format,
    /// Print nothing but errors.
    #[arg(short, long)]
    quiet: bool,
}

pub async fn run(client: &Client, args: CommitArgs) -> anyhow::Result<()> {
    let spinner = crate::progress::spinner(
        format!("committing {} to {}", args.name, args.image),
        args.quiet || args.format != Format::Table,
    );
    let result: Result<ImageSummary, _> = client
        .post(
            &format!("/machines/{}/commit", args.name),
            &CommitRequest { image: args.image },
        )
        .await;
    crate::progress::done(spinner);
    let image = result?;
    match (args.quiet, args.format) {
        (true, _) => {}
        (false, Format::Table) => println!("{}", image.reference),
        (false, format) => print!("{}", render_value(&image, format)?),
    }
    Ok(())
}
