//! `container machine stats`: what machines cost, in the shape of `docker stats`: a table that
//! refreshes until interrupted, or one sample with `--no-stream`.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use clap::Args;
use container_api::Client;
use container_api::size::format_size;
use container_api::stats::{MachineStats, StatsQuery};

use crate::output::{self, Format, Tabular};

/// How often a streaming display refreshes.
const REFRESH: Duration = Duration::from_secs(2);

#[derive(Debug, Args)]
#[command(after_help = "\
Columns: CPU % is host CPU time of the VM (QEMU and its helpers) in percent of one core since \
the previous sample; HOST MEM is the proportional set size (PSS) of those processes on the \
host, what stopping the machine gives back, and RSS counts shared pages in full; GUEST USED, \
CACHE and TOTAL are the guest kernel's own view; DISK is what the disk occupies on the host \
and its size; NET is bytes received / sent by the guest.

With --format json each sample is one JSON array on a line of its own (NDJSON); with \
--no-stream, one indented array.")]
pub struct StatsArgs {
    /// Machines to show (default: every running machine of yours).
    names: Vec<String>,
    /// Stopped machines too.
    #[arg(short, long)]
    all: bool,
    /// Print one sample and exit.
    #[arg(long)]
    no_stream: bool,
    #[arg(long, value_enum, default_value_t)]
    format: Format,
}

impl Tabular for MachineStats {
    fn headers() -> Vec<&'static str> {
        vec![
            "NAME",
            "STATE",
            "CPU %",
            "HOST MEM",
            "HOST RSS",
            "GUEST USED / TOTAL",
            "GUEST CACHE",
            "DISK",
            "NET RX / TX",
        ]
    }
    fn row(&self) -> Vec<String> {
        let dash = || "-".to_string();
        let host = self.host_memory.as_ref();
        let guest = self.guest_memory.as_ref();
        vec![
            self.id.clone(),
            self.status.to_string(),
            self.cpu_percent
                .map(|p| format!("{p:.1}%"))
                .unwrap_or_else(dash),
            host.map(|h| format_size(h.pss)).unwrap_or_else(dash),
            host.map(|h| format_size(h.rss)).unwrap_or_else(dash),
            guest
                .map(|g| format!("{} / {}", format_size(g.used), format_size(g.total)))
                .unwrap_or_else(dash),
            guest.map(|g| format_size(g.cache)).unwrap_or_else(dash),
            format!(
                "{} / {}",
                format_size(self.disk.allocated),
                format_size(self.disk.size)
            ),
            self.network
                .map(|n| format!("{} / {}", format_size(n.rx_bytes), format_size(n.tx_bytes)))
                .unwrap_or_else(dash),
        ]
    }
    fn id(&self) -> String {
        self.id.clone()
    }
}

pub async fn run(client: &Client, args: StatsArgs) -> anyhow::Result<()> {
    let query = serde_urlencoded::to_string(StatsQuery {
        names: args.names.join(","),
        all: args.all,
    })?;
    let path = format!("/stats?{query}");
    let terminal = std::io::stdout().is_terminal();
    loop {
        let stats: Vec<MachineStats> = client.get(&path).await?;
        let text = match (args.format, args.no_stream) {
            (Format::Json, false) => serde_json::to_string(&stats)? + "\n",
            (Format::Table, _) => output::render_list(&stats, Format::Table, false)?,
            (format, _) => output::render_value(&stats, format)?,
        };
        let mut out = std::io::stdout().lock();
        if !args.no_stream && terminal && args.format == Format::Table {
            // Home and clear: each sample replaces the last, as `docker stats` shows them.
            write!(out, "\x1b[H\x1b[J")?;
        }
        out.write_all(text.as_bytes())?;
        out.flush()?;
        if args.no_stream {
            return Ok(());
        }
        tokio::time::sleep(REFRESH).await;
    }
}
