//! `container image …`: pull, list, inspect, remove, tag, load and save images.
//!
//! Image names are per user: each command reads the caller's own names (then the system-wide
//! ones root publishes) and changes only the caller's own. Root acts on the system-wide names
//! with `--system` and lists every user's with `ls --all`.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use container_api::client::{self, ClientError};
use container_api::image::{
    ImageDetail, ImageSummary, PullEvent, PullRequest, RemoveReport, TagRequest,
};
use container_api::size::format_size;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use crate::output::{self, Format, Tabular};
use crate::service;

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Pull an image from a registry.
    Pull {
        /// Image reference, e.g. `127.0.0.1:5000/debian:12`.
        reference: String,
        /// Print nothing but errors.
        #[arg(short, long)]
        quiet: bool,
        /// Name it as a system-wide image, which every user can use (root only).
        #[arg(long)]
        system: bool,
    },
    /// List your images and the system-wide ones (OWNER `system`).
    #[command(visible_alias = "ls")]
    List {
        #[arg(long, value_enum, default_value_t)]
        format: Format,
        /// Print references only.
        #[arg(short, long)]
        quiet: bool,
        /// Every user's images, with their owner's uid (root only).
        #[arg(short, long)]
        all: bool,
    },
    /// Show everything about one or more images.
    Inspect {
        #[arg(required = true)]
        references: Vec<String>,
        #[arg(long, value_enum, default_value_t = Format::Json)]
        format: Format,
    },
    /// Remove images (their blobs and base disks go when nothing else uses them).
    #[command(visible_alias = "rm")]
    Delete {
        #[arg(required = true)]
        references: Vec<String>,
        /// Remove even when a machine was created from the image (the machine keeps working).
        #[arg(short, long)]
        force: bool,
        /// Remove system-wide names (root only).
        #[arg(long)]
        system: bool,
    },
    /// Give an image another reference (yours; a system-wide one with --system).
    Tag {
        source: String,
        target: String,
        /// Publish TARGET as a system-wide image, which every user can use (root only).
        #[arg(long)]
        system: bool,
    },
    /// Load images from an OCI image-layout or `docker save` tar archive.
    Load {
        /// The archive (default: standard input).
        #[arg(short, long)]
        input: Option<PathBuf>,
        /// Name them as system-wide images (root only).
        #[arg(long)]
        system: bool,
    },
    /// Save images to an OCI image-layout tar archive.
    Save {
        #[arg(required = true)]
        references: Vec<String>,
        /// The archive to write (default: standard output).
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
}

impl Tabular for ImageSummary {
    fn headers() -> Vec<&'static str> {
        vec!["NAME", "TAG", "DIGEST", "CREATED", "SIZE", "OWNER"]
    }
    fn row(&self) -> Vec<String> {
        let (name, tag) = split_reference(&self.reference);
        vec![
            name.to_string(),
            tag.to_string(),
            self.digest
                .trim_start_matches("sha256:")
                .chars()
                .take(12)
                .collect(),
            self.created
                .map(|c| c.format("%Y-%m-%d %H:%M:%S").to_string())
                .unwrap_or_default(),
            format_size(self.size),
            self.owner
                .map_or_else(|| "system".to_string(), |uid| uid.to_string()),
        ]
    }
    fn id(&self) -> String {
        self.reference.clone()
    }
}

/// Splits `host/name:tag` into name and tag (a port's colon is not a tag).
fn split_reference(reference: &str) -> (&str, &str) {
    if let Some((name, digest)) = reference.split_once('@') {
        return (name, digest);
    }
    match reference.rfind(':') {
        Some(i) if !reference[i..].contains('/') => (&reference[..i], &reference[i + 1..]),
        _ => (reference, "latest"),
    }
}

fn flag(on: bool) -> &'static str {
    if on { "true" } else { "false" }
}

fn query(pairs: &[(&str, &str)]) -> String {
    serde_urlencoded::to_string(pairs).expect("string pairs always encode")
}

impl ImageCommand {
    pub async fn run(self) -> anyhow::Result<()> {
        let client = service::connect().await?;
        match self {
            ImageCommand::Pull {
                reference,
                quiet,
                system,
            } => {
                let image = pull_into(&client, &reference, system, quiet).await?;
                if !quiet {
                    println!("{}", image.reference);
                }
            }
            ImageCommand::List { format, quiet, all } => {
                let path = match all {
                    true => "/images?all=true",
                    false => "/images",
                };
                let images: Vec<ImageSummary> = client.get(path).await?;
                print!("{}", output::render_list(&images, format, quiet)?);
            }
            ImageCommand::Inspect { references, format } => {
                let mut details = Vec::new();
                for r in &references {
                    let d: ImageDetail = client
                        .get(&format!("/images/inspect?{}", query(&[("reference", r)])))
                        .await?;
                    details.push(d);
                }
                print!("{}", output::render_value(&details, format)?);
            }
            ImageCommand::Delete {
                references,
                force,
                system,
            } => {
                for r in &references {
                    let report: RemoveReport = client
                        .delete(&format!(
                            "/images?{}",
                            query(&[
                                ("reference", r),
                                ("force", flag(force)),
                                ("system", flag(system)),
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
            }
            ImageCommand::Tag {
                source,
                target,
                system,
            } => {
                let image: ImageSummary = client
                    .post(
                        "/images/tag",
                        &TagRequest {
                            source,
                            target,
                            system,
                        },
                    )
                    .await?;
                println!("{}", image.reference);
            }
            ImageCommand::Load { input, system } => {
                let body = match &input {
                    Some(path) => {
                        let file = tokio::fs::File::open(path)
                            .await
                            .with_context(|| format!("opening {}", path.display()))?;
                        client::stream_body(tokio_util::io::ReaderStream::new(file))
                    }
                    None => {
                        client::stream_body(tokio_util::io::ReaderStream::new(tokio::io::stdin()))
                    }
                };
                let path = match system {
                    true => "/images/load?system=true",
                    false => "/images/load",
                };
                let images: Vec<ImageSummary> = client.upload(path, body).await?;
                for i in images {
                    println!("Loaded image: {}", i.reference);
                }
            }
            ImageCommand::Save { references, output } => {
                if output.is_none() && std::io::stdout().is_terminal() {
                    anyhow::bail!(
                        "refusing to write an archive to a terminal; use -o FILE or redirect standard output"
                    );
                }
                let pairs: Vec<(&str, &str)> = references
                    .iter()
                    .map(|r| ("reference", r.as_str()))
                    .collect();
                let response = client
                    .call_raw::<()>(
                        hyper::Method::GET,
                        &format!("/images/save?{}", query(&pairs)),
                        None,
                    )
                    .await?;
                let mut stream = Box::pin(client::body_stream(response));
                match &output {
                    Some(path) => {
                        // Written beside the target and renamed, so a failed save leaves no
                        // truncated archive behind.
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
            }
        }
        Ok(())
    }
}

/// Pulls an image into the caller's own names, showing progress bars on a terminal and
/// plain lines otherwise.
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

/// Renders pull events: bars on a terminal, one line per finished step otherwise.
struct Progress {
    quiet: bool,
    bars: Option<indicatif::MultiProgress>,
    by_digest: std::collections::HashMap<String, indicatif::ProgressBar>,
}

impl Progress {
    fn new(quiet: bool) -> Self {
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

    fn show(&mut self, event: &PullEvent) {
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

    fn finish(&mut self) {
        for bar in self.by_digest.values() {
            bar.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::split_reference;

    #[test]
    fn splits_references_with_ports_and_digests() {
        assert_eq!(
            split_reference("127.0.0.1:5000/debian:12"),
            ("127.0.0.1:5000/debian", "12")
        );
        assert_eq!(
            split_reference("127.0.0.1:5000/debian"),
            ("127.0.0.1:5000/debian", "latest")
        );
        assert_eq!(split_reference("x/y@sha256:ab"), ("x/y", "sha256:ab"));
    }
}
