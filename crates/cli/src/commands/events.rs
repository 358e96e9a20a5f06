//! `container system events`: your machines' lifecycle events as they happen, as lines of
//! text or of JSON (newline-delimited, one event a line, for tools and agents).

use std::io::Write;

use clap::{Args, ValueEnum};
use container_api::system::Event;
use container_api::{Client, ExitCode};
use futures::StreamExt;

use crate::exit::failed;

#[derive(Debug, Clone, Copy, Default, ValueEnum)]
pub enum EventFormat {
    /// TIME MACHINE ACTION DETAIL, one event a line.
    #[default]
    Table,
    /// One JSON object a line.
    Json,
}

/// What `--help` says beyond the one line (on the subcommand, which would hide it here).
pub const LONG_ABOUT: &str = "Stream the lifecycle events of your machines as they happen (created, booting, \
running, stopping, stopped, died, deleted, snapshot, clone, renamed) until interrupted. Other \
users' machines are never shown (root sees all).";

#[derive(Debug, Args)]
pub struct EventsArgs {
    #[arg(long, value_enum, default_value_t)]
    format: EventFormat,
    /// Only some events: `machine=NAME`.
    #[arg(long, value_name = "KEY=VALUE")]
    filter: Vec<String>,
}

pub async fn run(client: &Client, args: EventsArgs) -> anyhow::Result<()> {
    let mut machine = None;
    for f in &args.filter {
        match f.split_once('=') {
            Some(("machine", name)) if !name.is_empty() => machine = Some(name.to_string()),
            _ => {
                return Err(failed(
                    ExitCode::Usage,
                    format!("unknown filter `{f}`: use machine=NAME"),
                ));
            }
        }
    }
    let path = match &machine {
        Some(m) => format!(
            "/system/events?{}",
            serde_urlencoded::to_string([("machine", m)]).expect("encodes")
        ),
        None => "/system/events".to_string(),
    };
    let response = client
        .call_raw::<()>(hyper::Method::GET, &path, None)
        .await?;
    let mut stream = Box::pin(container_api::client::body_stream(response));
    let mut pending = Vec::new();
    let mut out = std::io::stdout();
    while let Some(chunk) = stream.next().await {
        pending.extend_from_slice(&chunk?);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let event: Event = serde_json::from_slice(&line)?;
            match args.format {
                EventFormat::Json => writeln!(out, "{}", serde_json::to_string(&event)?)?,
                EventFormat::Table => writeln!(
                    out,
                    "{}  {}  {}{}",
                    event
                        .time
                        .with_timezone(&chrono::Local)
                        .format("%Y-%m-%d %H:%M:%S"),
                    event.machine,
                    event.action,
                    event.detail.map(|d| format!("  {d}")).unwrap_or_default()
                )?,
            }
            out.flush()?;
        }
    }
    Ok(())
}
