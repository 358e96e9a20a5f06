//! `container machine …` (alias `m`): persistent machines. This file holds the subcommand enum
//! and its dispatch; each subcommand lives in a file of its own.

mod clone;
mod commit;
mod cp;
mod create;
mod delete;
mod inspect;
mod list;
mod logs;
mod ports;
mod rename;
mod restart;
mod run;
mod set;
mod set_default;
mod snapshot;
mod ssh;
mod start;
mod stats;
mod stop;

use clap::Subcommand;
use container_api::machine::Machine;
use container_api::{Client, ExitCode};

use crate::exit::failed;
use crate::service;

#[derive(Debug, Subcommand)]
pub enum MachineCommand {
    /// Create a machine from an image (pulled if absent) and boot it.
    Create(Box<create::CreateArgs>),
    /// Run a command in a machine (booting it if needed); no command: a login shell.
    Run(run::RunArgs),
    /// Boot a machine without running anything.
    Start(start::StartArgs),
    /// List machines.
    #[command(visible_alias = "ls")]
    List(list::ListArgs),
    /// Show everything about machines.
    Inspect(inspect::InspectArgs),
    /// Change settings: cpus, memory, disk-size (grow only), home-mount, kernel, autostart=on|off,
    /// forward-ports=on|off.
    Set(set::SetArgs),
    /// Make a machine the default for commands that take no name.
    SetDefault(set_default::SetDefaultArgs),
    /// Show a machine's console output (its init), or with --boot the boot log.
    Logs(logs::LogsArgs),
    /// Shut machines down cleanly through their init (forced after the timeout).
    Stop(stop::StopArgs),
    /// Delete machines and their disks.
    #[command(visible_alias = "rm")]
    Delete(delete::DeleteArgs),
    /// Copy files between the host and a machine (`NAME:/path` on one side).
    Cp(cp::CpArgs),
    /// Make a new machine from another's disk and settings (cheap; the source may run).
    #[command(long_about = clone::LONG_ABOUT)]
    Clone(clone::CloneArgs),
    /// Make an image of a machine's filesystem (one of your images; push it to share it).
    #[command(long_about = commit::LONG_ABOUT)]
    Commit(commit::CommitArgs),
    /// Snapshots of a machine's disk: create, ls, restore, rm (host home files not included).
    Snapshot(snapshot::SnapshotArgs),
    /// Give a stopped machine a new name.
    #[command(long_about = rename::LONG_ABOUT)]
    Rename(rename::RenameArgs),
    /// Stop machines (with stop's flags), then start them again.
    Restart(restart::RestartArgs),
    /// Show what machines cost: host CPU and memory, guest memory, disk and network.
    Stats(stats::StatsArgs),
    /// Print OpenSSH `Host` entries for your machines (`ssh dev.machine`, editors' remote
    /// SSH), or with --install add them to ~/.ssh/config through an Include.
    SshConfig(ssh::SshConfigArgs),
    /// ssh's ProxyCommand for a machine: stdin and stdout to its port 22, through the service.
    SshProxy(ssh::SshProxyArgs),
    /// List the host ports forwarded to a machine's listening ports, and those refused.
    Ports(ports::PortsArgs),
}

/// The machine a command without a name acts on.
pub async fn resolve_name(client: &Client, name: Option<String>) -> anyhow::Result<String> {
    if let Some(n) = name {
        return Ok(n);
    }
    let machines: Vec<Machine> = client.get("/machines").await?;
    machines
        .into_iter()
        .find(|m| m.default)
        .map(|m| m.id)
        .ok_or_else(|| {
            failed(
                ExitCode::NotFound,
                "no machine name given and there is no default machine; create one with `container machine create IMAGE` or pick one with `container machine set-default NAME`",
            )
        })
}

impl MachineCommand {
    /// Runs the subcommand; the exit code is the process's for `run`, 0 for the others.
    pub async fn run(self) -> anyhow::Result<u8> {
        let client = service::connect().await?;
        match self {
            MachineCommand::Create(args) => create::run(&client, *args).await?,
            MachineCommand::Run(args) => return run::run(&client, args).await,
            MachineCommand::Start(args) => start::run(&client, args).await?,
            MachineCommand::List(args) => list::run(&client, args).await?,
            MachineCommand::Inspect(args) => inspect::run(&client, args).await?,
            MachineCommand::Stats(args) => stats::run(&client, args).await?,
            MachineCommand::Ports(args) => ports::run(&client, args).await?,
            MachineCommand::Set(args) => set::run(&client, args).await?,
            MachineCommand::SetDefault(args) => set_default::run(&client, args).await?,
            MachineCommand::Logs(args) => logs::run(&client, args).await?,
            MachineCommand::Stop(args) => stop::run(&client, args).await?,
            MachineCommand::Delete(args) => delete::run(&client, args).await?,
            MachineCommand::Cp(args) => cp::run(&client, args).await?,
            MachineCommand::Clone(args) => clone::run(&client, args).await?,
            MachineCommand::Commit(args) => commit::run(&client, args).await?,
            MachineCommand::Snapshot(args) => snapshot::run(&client, args).await?,
            MachineCommand::Rename(args) => rename::run(&client, args).await?,
            MachineCommand::Restart(args) => restart::run(&client, args).await?,
            MachineCommand::SshConfig(args) => ssh::config(&client, args).await?,
            MachineCommand::SshProxy(args) => ssh::proxy(&client, args).await?,
        }
        Ok(0)
    }
}

/// How long `--wait` waits for a machine's init to finish booting: a systemd boot takes
/// seconds under KVM and can take minutes emulated on a loaded host.
const WAIT_LIMIT: std::time::Duration = std::time::Duration::from_secs(600);

/// `--wait`: waits until the image's init in `name` has finished booting (the machine is
/// `running` without `booting`); an error naming what it is instead.
pub async fn wait_until_booted(client: &Client, name: &str) -> anyhow::Result<Machine> {
    use container_api::machine::MachineState;
    let deadline = std::time::Instant::now() + WAIT_LIMIT;
    loop {
        let m: Machine = client.get(&format!("/machines/{name}")).await?;
        match m.status {
            MachineState::Running if !m.booting => return Ok(m),
            MachineState::Running | MachineState::Starting | MachineState::Booting => {}
            other => {
                return Err(failed(
                    ExitCode::Failure,
                    format!(
                        "machine `{name}` is {other}, not booting; see `container machine inspect {name}` and `container machine logs {name}`"
                    ),
                ));
            }
        }
        if std::time::Instant::now() > deadline {
            return Err(failed(
                ExitCode::Failure,
                format!(
                    "machine `{name}` did not finish booting within {} s; see `container machine logs {name}`",
                    WAIT_LIMIT.as_secs()
                ),
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}
