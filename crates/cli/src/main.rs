//! `container`: the command line of persistent Linux machines. The commands live under
//! `commands/`, a module per group (see there for which subcommands have files of their own);
//! this file only parses arguments, dispatches, and prints the error chain once.

mod commands;
mod output;
mod service;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Persistent Linux machines, each its own lightweight VM, created from OCI images.
#[derive(Debug, Parser)]
#[command(name = "container", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Manage persistent machines (alias: m).
    #[command(subcommand, visible_alias = "m")]
    Machine(commands::machine::MachineCommand),
    /// Manage images.
    #[command(subcommand, visible_alias = "i")]
    Image(commands::image::ImageCommand),
    /// Log in to and out of registries.
    #[command(subcommand)]
    Registry(commands::registry::RegistryCommand),
    /// Manage the container service.
    #[command(subcommand, visible_alias = "s")]
    System(commands::system::SystemCommand),
}

/// What a failed command exits with; `run` passes its process's status through instead.
const EXIT_FAILURE: u8 = 1;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("Error: starting the async runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Machine(c) => c.run().await,
            Command::Image(c) => c.run().await.map(|()| 0),
            Command::Registry(c) => c.run().await.map(|()| 0),
            Command::System(c) => c.run().await.map(|()| 0),
        }
    });
    // Streams to the service may still be closing; do not wait for them.
    runtime.shutdown_background();
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("Error: {e:#}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
