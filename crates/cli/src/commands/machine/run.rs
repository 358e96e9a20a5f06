//! `container machine run`: a process in a machine, its standard streams carried over an
//! upgraded connection. With a terminal, the local terminal goes raw and resizes follow; without
//! one, Ctrl-C and SIGTERM are passed to the process (three times forces the CLI out). With
//! `SSH_AUTH_SOCK` set, that agent is forwarded into the machine while the process runs.

use std::io::{IsTerminal, Write};

use clap::Args;
use container_api::machine::RunRequest;
use container_api::session::Frame;
use container_api::{Client, ExitCode};
use tokio::io::AsyncReadExt;

use crate::exit::failed;

#[derive(Debug, Args)]
#[command(
    trailing_var_arg = true,
    after_help = "SSH agent: when SSH_AUTH_SOCK is set, the machine has that agent at \
                  /var/host-services/ssh-auth.sock while the command runs, and SSH_AUTH_SOCK \
                  points there (in your own machines only). Run with SSH_AUTH_SOCK= to forward \
                  nothing."
)]
pub struct RunArgs {
    /// Machine name (default: the default machine).
    #[arg(short, long)]
    name: Option<String>,
    /// When the machine is not running, start it and wait until its init has finished
    /// booting before running the command (without it, the command runs as soon as it can).
    #[arg(long)]
    wait: bool,
    /// Start the process and return at once.
    #[arg(short, long)]
    detach: bool,
    /// Keep standard input open.
    #[arg(short, long)]
    interactive: bool,
    /// Allocate a terminal.
    #[arg(short, long)]
    tty: bool,
    /// Run as root (uid 0, gid 0) instead of your user.
    #[arg(long)]
    root: bool,
    /// Run as USER or UID[:GID].
    #[arg(short, long)]
    user: Option<String>,
    /// Run as this uid (its group from the machine's /etc/passwd unless --gid).
    #[arg(long)]
    uid: Option<u32>,
    /// Primary group; with --root, an added supplementary group (root's stays 0).
    #[arg(long)]
    gid: Option<u32>,
    /// Set KEY=VALUE, or pass KEY from your environment. Repeatable.
    #[arg(short, long = "env", value_name = "KEY[=VALUE]")]
    env: Vec<String>,
    /// Read environment variables from a file (KEY=VALUE lines).
    #[arg(long)]
    env_file: Vec<std::path::PathBuf>,
    /// Working directory inside the machine (default: your current directory when the
    /// machine can see it, else your home).
    #[arg(short, long, visible_aliases = ["cwd"])]
    workdir: Option<String>,
    /// Execute COMMAND as given, each argument passed verbatim (spaces, `$`, quotes, empty
    /// arguments kept), instead of through `/bin/sh -c`.
    #[arg(long)]
    no_shell: bool,
    /// The command and its arguments, joined by spaces and run by `/bin/sh -c` in the machine
    /// (as `ssh host CMD…`): `run echo '$HOME'` prints the machine's home. Default: your
    /// login shell.
    command: Vec<String>,
}

/// Expands `-e` and `--env-file` values into `KEY=VALUE` strings.
fn environment(args: &RunArgs) -> anyhow::Result<Vec<String>> {
    let mut env = Vec::new();
    for file in &args.env_file {
        let text = std::fs::read_to_string(file)
            .map_err(|e| anyhow::anyhow!("reading env file {}: {e}", file.display()))?;
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            push_env(&mut env, line)?;
        }
    }
    for e in &args.env {
        push_env(&mut env, e)?;
    }
    Ok(env)
}

fn push_env(env: &mut Vec<String>, item: &str) -> anyhow::Result<()> {
    match item.split_once('=') {
        Some(("", _)) => {
            return Err(failed(
                ExitCode::Usage,
                format!("invalid environment variable `{item}`: empty name"),
            ));
        }
        Some(_) => env.push(item.to_string()),
        // A bare KEY inherits the host's value, and is skipped when the host has none.
        None => {
            if let Ok(value) = std::env::var(item) {
                env.push(format!("{item}={value}"));
            }
        }
    }
    Ok(())
}

/// The agent to forward: `SSH_AUTH_SOCK`, made absolute (the service does not share our
/// working directory); none when unset or empty.
fn ssh_auth_sock() -> Option<String> {
    let sock = std::env::var_os("SSH_AUTH_SOCK").filter(|s| !s.is_empty())?;
    let path = std::path::PathBuf::from(sock);
    let path = match path.is_absolute() {
        true => path,
        false => std::env::current_dir().ok()?.join(path),
    };
    Some(path.to_string_lossy().into_owned())
}

/// Puts the local terminal in raw mode until dropped.
struct RawTerminal {
    saved: rustix::termios::Termios,
}

impl RawTerminal {
    fn enable() -> anyhow::Result<Self> {
        use rustix::termios::{OptionalActions, tcgetattr, tcsetattr};
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin)?;
        let mut raw = saved.clone();
        raw.make_raw();
        tcsetattr(&stdin, OptionalActions::Now, &raw)?;
        Ok(Self { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(
            std::io::stdin(),
            rustix::termios::OptionalActions::Now,
            &self.saved,
        );
    }
}

fn window_size() -> Option<(u16, u16)> {
    rustix::termios::tcgetwinsize(std::io::stdout())
        .ok()
        .filter(|w| w.ws_row > 0)
        .map(|w| (w.ws_row, w.ws_col))
}

pub async fn run(client: &Client, args: RunArgs) -> anyhow::Result<u8> {
    let name = super::resolve_name(client, args.name.clone()).await?;
    if args.wait {
        let _: container_api::machine::Machine = client
            .post(&format!("/machines/{name}/start"), &serde_json::json!({}))
            .await?;
        super::wait_until_booted(client, &name).await?;
    }
    let shell = args.command.is_empty();
    let on_terminal = std::io::stdin().is_terminal();
    // A shell gets a terminal when there is one; with `-i` and none, it reads its commands
    // from stdin (`container machine run -i < script`), as over ssh.
    let tty = args.tty || (shell && (on_terminal || !args.interactive));
    let interactive = args.interactive || shell;
    if tty && !on_terminal && shell {
        return Err(failed(
            ExitCode::Usage,
            format!(
                "an interactive shell needs a terminal; give a command to run (e.g. `container machine run -n {name} uname -a`), or -i to feed the shell from stdin"
            ),
        ));
    }
    let size = if tty { window_size() } else { None };
    let mut env = environment(&args)?;
    // The local terminal's type, so programs inside draw for it.
    if tty
        && let Ok(term) = std::env::var("TERM")
        && !env.iter().any(|e| e.starts_with("TERM="))
    {
        env.insert(0, format!("TERM={term}"));
    }
    let request = RunRequest {
        command: args.command.clone(),
        no_shell: args.no_shell,
        env,
        workdir: args.workdir.clone(),
        caller_cwd: std::env::current_dir()
            .ok()
            .map(|p| p.display().to_string()),
        root: args.root,
        user: args.user.clone(),
        uid: args.uid,
        gid: args.gid,
        tty,
        interactive,
        detach: args.detach,
        rows: size.map(|s| s.0),
        cols: size.map(|s| s.1),
        ssh_auth_sock: ssh_auth_sock(),
    };
    let io = client
        .upgrade(&format!("/machines/{name}/exec"), &request)
        .await?;
    let (mut reader, mut writer) = tokio::io::split(io);

    if args.detach {
        return match Frame::read(&mut reader).await? {
            Some(Frame::Started { .. }) => {
                println!("{name}");
                Ok(0)
            }
            Some(Frame::Error(e)) => Err(e.into()),
            other => anyhow::bail!("unexpected answer to a detached run: {other:?}"),
        };
    }

    let raw = if tty && std::io::stdin().is_terminal() {
        Some(RawTerminal::enable()?)
    } else {
        None
    };

    // Everything the user side produces goes through one channel to the writer task.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Frame>(64);
    let writer_task = tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            if frame.write(&mut writer).await.is_err() {
                break;
            }
        }
    });
    if interactive {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut stdin = tokio::io::stdin();
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match stdin.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        let _ = tx.send(Frame::StdinEof).await;
                        break;
                    }
                    Ok(n) => {
                        if tx.send(Frame::Stdin(buf[..n].to_vec())).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
    } else {
        let _ = tx.send(Frame::StdinEof).await;
    }
    {
        let tx = tx.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut winch), Ok(mut int), Ok(mut term)) = (
                signal(SignalKind::window_change()),
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) else {
                return;
            };
            let mut interrupts = 0;
            loop {
                let frame = tokio::select! {
                    _ = winch.recv() => match window_size() {
                        Some((rows, cols)) if tty => Frame::Resize { rows, cols },
                        _ => continue,
                    },
                    _ = int.recv() => { interrupts += 1; Frame::Signal(libc::SIGINT) }
                    _ = term.recv() => { interrupts += 1; Frame::Signal(libc::SIGTERM) }
                };
                if interrupts >= 3 {
                    eprintln!(
                        "\r\ncontainer: interrupted three times, leaving the process running"
                    );
                    std::process::abort();
                }
                if tx.send(frame).await.is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);

    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    let code = loop {
        match Frame::read(&mut reader).await {
            Ok(Some(Frame::Stdout(b))) => {
                stdout.write_all(&b)?;
                stdout.flush()?;
            }
            Ok(Some(Frame::Stderr(b))) => {
                stderr.write_all(&b)?;
                stderr.flush()?;
            }
            Ok(Some(Frame::Started { .. })) => {}
            Ok(Some(Frame::Exit(status))) => break status.shell_code(),
            Ok(Some(Frame::Error(e))) => {
                drop(raw);
                return Err(e.into());
            }
            Ok(Some(other)) => {
                drop(raw);
                anyhow::bail!("unexpected frame from the service: {other:?}");
            }
            Ok(None) => {
                drop(raw);
                anyhow::bail!("the connection to machine {name} closed before the process ended");
            }
            Err(e) => {
                drop(raw);
                return Err(e.into());
            }
        }
    };
    drop(raw);
    writer_task.abort();
    Ok(code.clamp(0, 255) as u8)
}

#[cfg(test)]
mod tests {
    use super::push_env;

    #[test]
    fn bare_keys_inherit_and_empty_names_fail() {
        let mut env = Vec::new();
        push_env(&mut env, "A=1").unwrap();
        // PATH is set in every test environment.
        push_env(&mut env, "PATH").unwrap();
        push_env(&mut env, "CONTAINER_TEST_SURELY_UNSET_VARIABLE").unwrap();
        assert_eq!(env[0], "A=1");
        assert!(env[1].starts_with("PATH="));
        assert_eq!(env.len(), 2);
        assert!(push_env(&mut env, "=x").is_err());
    }
}
