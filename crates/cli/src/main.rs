//! `container`: the command line of persistent Linux machines. The commands live under
//! `commands/`, a module per group (see there for which subcommands have files of their own);
//! this file only parses arguments, dispatches, prints the error chain once, and exits with
//! the code `exit.rs` finds for it.

mod commands;
mod completion;
mod exit;
mod output;
mod progress;
mod service;
mod systemd;

use clap::{Parser, Subcommand};
use container_api::ExitCode;

/// Persistent Linux machines, each its own lightweight VM, created from OCI images.
#[derive(Debug, Parser)]
#[command(
    name = "container",
    version,
    propagate_version = true,
    after_help = ExitCode::help_table()
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Manage persistent machines.
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
    /// Print the completion script for a shell (bash, zsh, fish).
    Completion(completion::CompletionArgs),
    /// Write the manual pages (container-machine-create.1, …) to a directory.
    #[command(hide = true)]
    GenerateMan(completion::GenerateManArgs),
}

fn main() -> std::process::ExitCode {
    // A shell's completion script calls back with COMPLETE set: answer, print nothing else.
    completion::answer_if_asked::<Cli>();
    // clap exits by itself: 2 for usage errors, 0 for --help and --version.
    let cli = Cli::parse();
    // These two need neither the service nor the async runtime.
    match cli.command {
        Command::Completion(args) => return finish(args.run()),
        Command::GenerateMan(args) => return finish(args.run::<Cli>()),
        _ => {}
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("Error: starting the async runtime: {e}");
            return ExitCode::Failure.code().into();
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Machine(c) => c.run().await,
            Command::Image(c) => c.run().await.map(|()| 0),
            Command::Registry(c) => c.run().await.map(|()| 0),
            Command::System(c) => c.run().await,
            Command::Completion(_) | Command::GenerateMan(_) => Ok(0),
        }
    });
    // Streams to the service may still be closing; do not wait for them.
    runtime.shutdown_background();
    match result {
        Ok(code) => code.into(),
        Err(e) => {
            eprintln!("Error: {e:#}");
            exit::code_of(&e).code().into()
        }
    }
}

/// The exit of a command that returns no code of its own.
fn finish(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => ExitCode::Success.code().into(),
        Err(e) => {
            eprintln!("Error: {e:#}");
            exit::code_of(&e).code().into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// The long help of `container ARGS --help`.
    fn long_help(args: &[&str]) -> String {
        let mut cmd = Cli::command();
        for a in args {
            cmd = cmd.find_subcommand(a).expect(a).clone();
        }
        cmd.render_long_help().to_string()
    }

    #[test]
    fn long_help_says_more_than_the_summary() {
        for (args, says) in [
            (&["machine", "clone"][..], "not copied"),
            (&["machine", "commit"], "org.container.machine.source"),
            (&["machine", "rename"], "still is"),
            (&["image", "push"], "not sent again"),
            (&["system", "events"], "root sees all"),
        ] {
            let help = long_help(args);
            assert!(help.contains(says), "{args:?} --help: {help}");
        }
    }
}
