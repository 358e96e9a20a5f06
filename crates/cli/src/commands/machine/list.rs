//! `container machine list` (alias `ls`): the caller's machines, as a table or a document.

use clap::Args;
use container_api::Client;
use container_api::machine::Machine;
use container_api::size::format_size;

use crate::output::{self, Format, Tabular};

#[derive(Debug, Args)]
pub struct ListArgs {
    #[arg(long, value_enum, default_value_t)]
    format: Format,
    /// Print names only.
    #[arg(short, long)]
    quiet: bool,
}

impl Tabular for Machine {
    fn headers() -> Vec<&'static str> {
        vec![
            "NAME", "IMAGE", "CREATED", "IP", "CPUS", "MEMORY", "DISK", "STATE", "DEFAULT",
        ]
    }
    fn row(&self) -> Vec<String> {
        vec![
            self.id.clone(),
            self.image.reference.clone(),
            self.created_date
                .with_timezone(&chrono::Local)
                .format("%Y-%m-%d %H:%M:%S")
                .to_string(),
            self.ip_address.clone().unwrap_or_else(|| "-".into()),
            self.cpus.to_string(),
            format_size(self.memory),
            format_size(self.disk_allocated),
            match self.booting {
                true => format!("{} (booting)", self.status),
                false => self.status.to_string(),
            },
            if self.default {
                "*".into()
            } else {
                String::new()
            },
        ]
    }
    fn id(&self) -> String {
        self.id.clone()
    }
}

pub async fn run(client: &Client, args: ListArgs) -> anyhow::Result<()> {
    let machines: Vec<Machine> = client.get("/machines").await?;
    print!(
        "{}",
        output::render_list(&machines, args.format, args.quiet)?
    );
    Ok(())
}
