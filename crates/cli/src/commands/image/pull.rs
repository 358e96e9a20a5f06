//! `container image pull`: an image from a registry into the store, with progress bars on a
//! terminal and plain lines otherwise. `machine create` pulls through here too.

use std::io::IsTerminal;

use clap::Args;
use container_api::Client;
use container_api::client::{self, ClientError};
use container_api::image::{ImageSummary, PullEvent, PullRequest};
use futures::StreamExt;

#[derive(Debug, Args)]
pub struct PullArgs {
    /// Image reference, e.g. `127.0.0.1:5000/debian:12`.
    reference: String,
    /// Print nothing but errors.
    #[arg(short, long)]
    quiet: bool,
    /// Name it as a system-wide image, which every user can use (root only).
    #[arg(long)]
    system: bool,
}

pub async fn run(client: &Client, args: PullArgs) -> anyhow::Result<()> {
    let image = pull_into(client, &args.reference, args.system, args.quiet).await?;
    if !args.quiet {
        println!("{}", image.reference);
    }
    Ok(())
}

/// Pulls an image, showing progress bars on a terminal and plain lines otherwise.
pub async fn pull(
    client: &container_api::Client,
    reference: &str,
    quiet: bool,
) -> anyhow::Result<ImageSummary> {
    pull_into(client, reference, false, quiet).await
}

/// [`pull`], naming the image system-wide when `system` (root only).
async fn pull_into(
    client: &container_api::Client,
    reference: &str,
    system: bool,
    quiet: bool,
) -> anyhow::Result<ImageSummary> {
    let response = client
        .call_raw(
            hyper::Method::POST,
            "/images/pull",
            Some(&PullRequest {
                reference: reference.to_string(),
                system,
            }),
        )
        .await?;
    let mut events = Box::pin(client::ndjson::<PullEvent>(response));
    let mut progress = Progress::new(quiet);
    while let Some(event) = events.next().await {
        match event? {
            PullEvent::Done { image } => {
                progress.finish();
                return Ok(image);
            }
            PullEvent::Error { error } => {
                progress.finish();
                return Err(ClientError::Api(error).into());
            }
            other => progress.show(&other),
        }
    }
    anyhow::bail!("the service closed the pull of {reference} without a result")
}

/// Renders pull (and push) events: bars on a terminal, one line per finished step otherwise.
pub(super) struct Progress {
    quiet: bool,
    bars: Option<indicatif::MultiProgress>,
    by_digest: std::collections::HashMap<String, indicatif::ProgressBar>,
}

impl Progress {
    pub(super) fn new(quiet: bool) -> Self {
        let bars = (!quiet && std::io::stderr().is_terminal()).then(indicatif::MultiProgress::new);
        Self {
            quiet,
            bars,
            by_digest: Default::default(),
        }
    }

    fn short(digest: &str) -> String {
        digest
            .trim_start_matches("sha256:")
            .chars()
            .take(12)
            .collect()
    }

    pub(super) fn show(&mut self, event: &PullEvent) {
        if self.quiet {
            return;
        }
        match (&self.bars, event) {
            (None, PullEvent::Resolved { digest, layers }) => {
                eprintln!("resolved {} ({layers} layers)", Self::short(digest))
            }
            (None, PullEvent::BlobDone { digest, cached }) => eprintln!(
                "{} {}",
                Self::short(digest),
                if *cached { "already present" } else { "done" }
            ),
            (_, PullEvent::Step { message }) => match &self.bars {
                Some(bars) => {
                    let _ = bars.println(message);
                }
                None => eprintln!("{message}"),
            },
            (
                Some(bars),
                PullEvent::Progress {
                    digest,
                    current,
                    total,
                },
            ) => {
                let bar = self.by_digest.entry(digest.clone()).or_insert_with(|| {
                    let bar = bars.add(indicatif::ProgressBar::new(*total));
                    bar.set_style(
                        indicatif::ProgressStyle::with_template(
                            "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
                        )
                        .expect("a valid progress template")
                        .progress_chars("=> "),
                    );
                    bar.set_prefix(Self::short(digest));
                    bar
                });
                bar.set_position(*current);
            }
            (Some(_), PullEvent::BlobDone { digest, .. }) => {
                if let Some(bar) = self.by_digest.get(digest) {
                    bar.finish();
                }
            }
            _ => {}
        }
    }

    pub(super) fn finish(&mut self) {
        for bar in self.by_digest.values() {
            bar.finish();
        }
    }
}
