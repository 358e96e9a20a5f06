//! `container image push`: an image of the store to the registry its reference names, with
//! progress bars per layer on a terminal and plain lines otherwise (as `pull`).

use clap::Args;
use container_api::Client;
use container_api::client::{self, ClientError};
use container_api::image::{PullEvent, PushRequest};
use futures::StreamExt;

use super::pull::Progress;
use crate::output::{Format, render_value};

/// What `--help` says beyond the one line (on the subcommand, which would hide it here).
pub const LONG_ABOUT: &str = "Push one of your images (or a system-wide one) to the registry its name \
points at: `container image tag` it first to push it elsewhere, e.g. \
`container image tag dev 127.0.0.1:5000/me/dev:1`. Layers the registry has already are not \
sent again. Registries on this machine's loopback, and those listed in `insecure` under \
[registry] in config.toml, are reached over plain HTTP, others over HTTPS; mirrors are only \
read from. Credentials are yours from `container registry login`.";

#[derive(Debug, Args)]
pub struct PushArgs {
    /// The image to push, by reference (e.g. `127.0.0.1:5000/me/dev:1`) or digest.
    reference: String,
    /// Output format of the pushed image: `table` prints its reference, the others its
    /// summary.
    #[arg(long, value_enum, default_value_t)]
    format: Format,
    /// Print nothing but errors.
    #[arg(short, long)]
    quiet: bool,
}

pub async fn run(client: &Client, args: PushArgs) -> anyhow::Result<()> {
    let response = client
        .call_raw(
            hyper::Method::POST,
            "/images/push",
            Some(&PushRequest {
                reference: args.reference.clone(),
            }),
        )
        .await?;
    let mut events = Box::pin(client::ndjson::<PullEvent>(response));
    let mut progress = Progress::new(args.quiet || args.format != Format::Table);
    while let Some(event) = events.next().await {
        match event? {
            PullEvent::Done { image } => {
                progress.finish();
                match (args.quiet, args.format) {
                    (true, _) => {}
                    (false, Format::Table) => println!("{}", image.reference),
                    (false, format) => print!("{}", render_value(&image, format)?),
                }
                return Ok(());
            }
            PullEvent::Error { error } => {
                progress.finish();
                return Err(ClientError::Api(error).into());
            }
            other => progress.show(&other),
        }
    }
    anyhow::bail!(
        "the service closed the push of {} without a result",
        args.reference
    )
}
