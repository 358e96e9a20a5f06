//! `container image …` (alias `i`): pull, push, list, inspect, remove, tag, load, save and prune
//! images.
//! This file holds the subcommand enum and its dispatch; each subcommand lives in a file of
//! its own.
//!
//! Image names are per user: each command reads the caller's own names (then the system-wide
//! ones root publishes) and changes only the caller's own. Root acts on the system-wide names
//! with `--system` and lists every user's with `ls --all`.

mod delete;
mod inspect;
mod list;
mod load;
mod prune;
mod pull;
mod push;
mod save;
mod tag;

use clap::Subcommand;

pub use pull::pull;

use crate::service;

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Pull an image from a registry.
    Pull(pull::PullArgs),
    /// Push one of your images to the registry its name points at.
    #[command(long_about = push::LONG_ABOUT)]
    Push(push::PushArgs),
    /// List your images and the system-wide ones (OWNER `system`).
    #[command(visible_alias = "ls")]
    List(list::ListArgs),
    /// Show everything about one or more images.
    Inspect(inspect::InspectArgs),
    /// Remove images (their blobs and base disks go when nothing else uses them).
    #[command(visible_alias = "rm")]
    Delete(delete::DeleteArgs),
    /// Give an image another reference (yours; a system-wide one with --system).
    Tag(tag::TagArgs),
    /// Load images from an OCI image-layout or `docker save` tar archive.
    Load(load::LoadArgs),
    /// Save images to an OCI image-layout tar archive.
    Save(save::SaveArgs),
    /// Remove your images no machine of yours uses (--all), and say what that reclaimed.
    Prune(prune::PruneArgs),
}

/// A query value for a flag.
fn flag(on: bool) -> &'static str {
    if on { "true" } else { "false" }
}

/// A URL query string from name/value pairs.
fn query(pairs: &[(&str, &str)]) -> String {
    serde_urlencoded::to_string(pairs).expect("string pairs always encode")
}

impl ImageCommand {
    pub async fn run(self) -> anyhow::Result<()> {
        let client = service::connect().await?;
        match self {
            ImageCommand::Pull(args) => pull::run(&client, args).await,
            ImageCommand::Push(args) => push::run(&client, args).await,
            ImageCommand::List(args) => list::run(&client, args).await,
            ImageCommand::Inspect(args) => inspect::run(&client, args).await,
            ImageCommand::Delete(args) => delete::run(&client, args).await,
            ImageCommand::Tag(args) => tag::run(&client, args).await,
            ImageCommand::Load(args) => load::run(&client, args).await,
            ImageCommand::Save(args) => save::run(&client, args).await,
            ImageCommand::Prune(args) => prune::run(&client, args).await,
        }
    }
}
