//! Shell completions and manual pages, both generated from the clap definition.
//!
//! Completions are dynamic (clap_complete's `COMPLETE=SHELL container -- WORDS…` protocol):
//! the script `container completion SHELL` prints only registers a function that calls this
//! binary back on each Tab, so subcommands and flags always match the installed binary, and
//! machine and image names come from the service at that moment. Completing never starts the
//! service and gives up on it quickly: a Tab must not hang.
//!
//! Manual pages (`container-machine-create.1`, …) are written by the hidden
//! `container generate-man DIR`, which the install script runs.

use std::time::Duration;

use clap::{Args, CommandFactory, ValueEnum};
use clap_complete::engine::{ArgValueCandidates, CompletionCandidate};
use clap_complete::env::{CompleteEnv, EnvCompleter, Shells};
use container_api::image::ImageSummary;
use container_api::machine::Machine;
use container_api::{Client, paths};

/// The environment variable that turns a run of `container` into a completion request.
const COMPLETE_VAR: &str = "COMPLETE";

/// How long a Tab waits for the service.
const SERVICE_WAIT: Duration = Duration::from_millis(1500);

/// Answers a completion request and exits when the shell's script called this binary for
/// one; returns at once otherwise.
pub fn answer_if_asked<C: CommandFactory>() {
    CompleteEnv::with_factory(|| with_candidates(C::command()))
        .var(COMPLETE_VAR)
        .complete();
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

/// `container completion SHELL`.
#[derive(Debug, Args)]
#[command(after_help = "Install (done by scripts/install.sh):\n  \
    bash: container completion bash > /usr/local/share/bash-completion/completions/container\n  \
    zsh:  container completion zsh > /usr/local/share/zsh/site-functions/_container\n  \
    fish: container completion fish > /usr/local/share/fish/vendor_completions.d/container.fish\n\
    Or for this shell only: source <(container completion bash)")]
pub struct CompletionArgs {
    /// The shell to print the completion script for.
    #[arg(value_enum)]
    shell: Shell,
}

impl CompletionArgs {
    /// Prints the registration script: it calls this very binary (by its absolute path) back.
    pub fn run(self) -> anyhow::Result<()> {
        let name = match self.shell {
            Shell::Bash => "bash",
            Shell::Zsh => "zsh",
            Shell::Fish => "fish",
        };
        let shells = Shells::builtins();
        let shell: &dyn EnvCompleter = shells
            .completer(name)
            .ok_or_else(|| anyhow::anyhow!("clap_complete knows no shell {name}"))?;
        let exe = std::env::current_exe()?;
        let mut out = std::io::stdout().lock();
        shell.write_registration(
            COMPLETE_VAR,
            "container",
            "container",
            &exe.to_string_lossy(),
            &mut out,
        )?;
        Ok(())
    }
}

/// `container generate-man DIR` (hidden): one page per command, `container-machine-create.1`.
#[derive(Debug, Args)]
pub struct GenerateManArgs {
    /// The directory the pages are written to (created if missing).
    dir: std::path::PathBuf,
}

impl GenerateManArgs {
    pub fn run<C: CommandFactory>(self) -> anyhow::Result<()> {
        use anyhow::Context;
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        clap_mangen::generate_to(C::command(), &self.dir)
            .with_context(|| format!("writing manual pages to {}", self.dir.display()))?;
        Ok(())
    }
}

/// The command tree with name candidates on the arguments that take existing names.
fn with_candidates(cli: clap::Command) -> clap::Command {
    cli.mut_subcommand("machine", |machine| {
        let names: Vec<String> = machine
            .get_subcommands()
            .map(|s| s.get_name().to_string())
            .collect();
        names.into_iter().fold(machine, |machine, sub| {
            machine.mut_subcommand(&sub, |cmd| {
                let cmd = if sub == "create" {
                    // `--name` is a new name there; the image is an existing one.
                    with_values(cmd, "image", image_names)
                } else {
                    with_values(cmd, "name", machine_names)
                };
                with_values(cmd, "names", machine_names)
            })
        })
    })
    .mut_subcommand("image", |image| {
        ["inspect", "delete", "tag", "save"]
            .into_iter()
            .fold(image, |image, sub| {
                image.mut_subcommand(sub, |cmd| {
                    let positional: Vec<String> = cmd
                        .get_positionals()
                        .map(|a| a.get_id().to_string())
                        .collect();
                    positional
                        .iter()
                        .fold(cmd, |cmd, id| with_values(cmd, id, image_names))
                })
            })
    })
}

/// `cmd` with `values` as the candidates of its argument `id`, when it has one.
fn with_values(
    cmd: clap::Command,
    id: &str,
    values: fn() -> Vec<CompletionCandidate>,
) -> clap::Command {
    if cmd.get_arguments().any(|a| a.get_id() == id) {
        cmd.mut_arg(id, |a| a.add(ArgValueCandidates::new(values)))
    } else {
        cmd
    }
}

/// The caller's machines, from the service if it answers in time.
fn machine_names() -> Vec<CompletionCandidate> {
    let machines: Vec<Machine> = ask_service("/machines").unwrap_or_default();
    machines
        .into_iter()
        .map(|m| CompletionCandidate::new(m.id))
        .collect()
}

/// The images the caller sees, from the service if it answers in time.
fn image_names() -> Vec<CompletionCandidate> {
    let images: Vec<ImageSummary> = ask_service("/images").unwrap_or_default();
    images
        .into_iter()
        .map(|i| CompletionCandidate::new(i.reference))
        .collect()
}

/// One GET to the service, without starting it, bounded by [`SERVICE_WAIT`].
fn ask_service<T: serde::de::DeserializeOwned>(path: &str) -> Option<T> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    runtime.block_on(async {
        let client = Client::new(paths::socket());
        tokio::time::timeout(SERVICE_WAIT, client.get::<T>(path))
            .await
            .ok()?
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every name-taking argument the completion engine should fill from the service.
    fn has_candidates(cmd: &clap::Command, path: &[&str], id: &str) -> bool {
        let mut cmd = cmd.clone();
        cmd.build();
        let mut cur = &cmd;
        for p in path {
            cur = cur.find_subcommand(p).expect("subcommand");
        }
        cur.get_arguments()
            .find(|a| a.get_id() == id)
            .and_then(|a| a.get::<ArgValueCandidates>())
            .is_some()
    }

    #[test]
    fn names_complete_where_an_existing_name_is_expected() {
        let cmd = with_candidates(crate::Cli::command());
        assert!(has_candidates(&cmd, &["machine", "run"], "name"));
        assert!(has_candidates(&cmd, &["machine", "stop"], "names"));
        assert!(has_candidates(&cmd, &["machine", "delete"], "names"));
        assert!(has_candidates(&cmd, &["machine", "create"], "image"));
        // A new machine's name has nothing to complete.
        assert!(!has_candidates(&cmd, &["machine", "create"], "name"));
        assert!(has_candidates(&cmd, &["image", "inspect"], "references"));
    }
}
