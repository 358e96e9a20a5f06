//! `container machine snapshot create|ls|restore|rm`: points in time of a machine's disk.

use clap::{Args, Subcommand};
use container_api::Client;
use container_api::machine::{Snapshot, SnapshotCreateRequest, SnapshotRestoreRequest};
use container_api::size::format_size;

use crate::output::{self, Format, Tabular};

/// What every snapshot subcommand says about what a snapshot holds.
const HOLDS: &str = "A snapshot holds the machine's disk: files in your host home (shared into \
the machine) and in --mount directories live on the host and are not part of it.";

#[derive(Debug, Args)]
#[command(long_about = format!("Snapshots of a machine's disk. {HOLDS}"))]
pub struct SnapshotArgs {
    #[command(subcommand)]
    command: SnapshotCommand,
}

#[derive(Debug, Subcommand)]
enum SnapshotCommand {
    /// Take a snapshot of the machine's disk now (a running machine keeps running).
    #[command(long_about = format!("Take a snapshot of the machine's disk now; a running machine keeps running, its filesystem frozen for the instant the snapshot is taken. {HOLDS}"))]
    Create {
        /// The machine.
        name: String,
        /// The snapshot's name (default: from the time).
        snapshot: Option<String>,
    },
    /// List a machine's snapshots.
    #[command(visible_alias = "ls")]
    List {
        /// The machine.
        name: String,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
        /// Print snapshot names only.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Bring the machine's disk back to a snapshot, exactly; what was written since is lost.
    #[command(long_about = format!("Bring the machine's disk back to a snapshot, exactly; what was written to the disk since is lost. The machine must be stopped, or -f stops it. {HOLDS}"))]
    Restore {
        /// The machine.
        name: String,
        /// The snapshot to bring back.
        snapshot: String,
        /// Stop the machine first if it runs.
        #[arg(short, long)]
        force: bool,
    },
    /// Delete a snapshot (the machine's disk is unchanged).
    #[command(visible_alias = "rm")]
    Delete {
        /// The machine.
        name: String,
        /// The snapshots to delete.
        #[arg(required = true)]
        snapshots: Vec<String>,
    },
}

impl Tabular for Snapshot {
    fn headers() -> Vec<&'static str> {
        vec!["NAME", "MACHINE", "CREATED", "SIZE"]
    }
    fn row(&self) -> Vec<String> {
        vec![
            self.name.clone(),
            self.machine.clone(),
            self.created_date
                .with_timezone(&chrono::Local)
                .format("%Y-%m-%d %H:%M:%S")
                .to_string(),
            format_size(self.size),
        ]
    }
    fn id(&self) -> String {
        self.name.clone()
    }
}

pub async fn run(client: &Client, args: SnapshotArgs) -> anyhow::Result<()> {
    match args.command {
        SnapshotCommand::Create { name, snapshot } => {
            let s: Snapshot = client
                .post(
                    &format!("/machines/{name}/snapshots"),
                    &SnapshotCreateRequest { name: snapshot },
                )
                .await?;
            println!("{}", s.name);
        }
        SnapshotCommand::List {
            name,
            format,
            quiet,
        } => {
            let all: Vec<Snapshot> = client.get(&format!("/machines/{name}/snapshots")).await?;
            print!("{}", output::render_list(&all, format, quiet)?);
        }
        SnapshotCommand::Restore {
            name,
            snapshot,
            force,
        } => {
            let s: Snapshot = client
                .post(
                    &format!("/machines/{name}/snapshots/{snapshot}/restore"),
                    &SnapshotRestoreRequest { force },
                )
                .await?;
            println!("{}", s.name);
        }
        SnapshotCommand::Delete { name, snapshots } => {
            for snapshot in snapshots {
                let s: Snapshot = client
                    .delete(&format!("/machines/{name}/snapshots/{snapshot}"))
                    .await?;
                println!("{}", s.name);
            }
        }
    }
    Ok(())
}
