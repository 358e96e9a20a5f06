//! `container image list` (alias `ls`): the images in the store, as a table or a document.

use clap::Args;
use container_api::Client;
use container_api::image::ImageSummary;
use container_api::size::format_size;

use crate::output::{self, Format, Tabular};

#[derive(Debug, Args)]
pub struct ListArgs {
    #[arg(long, value_enum, default_value_t)]
    format: Format,
    /// Print references only.
    #[arg(short, long)]
    quiet: bool,
    /// Every user's images, with their owner's uid (root only).
    #[arg(short, long)]
    all: bool,
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

pub async fn run(client: &Client, args: ListArgs) -> anyhow::Result<()> {
    let path = match args.all {
        true => "/images?all=true",
        false => "/images",
    };
    let images: Vec<ImageSummary> = client.get(path).await?;
    print!("{}", output::render_list(&images, args.format, args.quiet)?);
    Ok(())
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
