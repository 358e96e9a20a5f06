//! `container registry login|logout`: credentials the service uses for pulls.

use std::io::{BufRead, IsTerminal};

use clap::Subcommand;
use container_api::image::LoginRequest;

use crate::service;

#[derive(Debug, Subcommand)]
pub enum RegistryCommand {
    /// Store credentials for a registry (checked against it first).
    Login {
        /// Registry host, e.g. `127.0.0.1:5000`.
        server: String,
        #[arg(short, long)]
        username: String,
        /// Read the password from standard input (otherwise prompted on a terminal).
        #[arg(long)]
        password_stdin: bool,
    },
    /// Forget the credentials of a registry.
    Logout { server: String },
}

impl RegistryCommand {
    pub async fn run(self) -> anyhow::Result<()> {
        let client = service::connect().await?;
        match self {
            RegistryCommand::Login {
                server,
                username,
                password_stdin,
            } => {
                let password = if password_stdin || !std::io::stdin().is_terminal() {
                    let mut line = String::new();
                    std::io::stdin().lock().read_line(&mut line)?;
                    line.trim_end_matches(['\n', '\r']).to_string()
                } else {
                    read_password("Password: ")?
                };
                if password.is_empty() {
                    anyhow::bail!("an empty password was given for {server}");
                }
                let _: serde_json::Value = client
                    .post(
                        "/registry/login",
                        &LoginRequest {
                            server: server.clone(),
                            username,
                            password,
                        },
                    )
                    .await?;
                println!("Login succeeded for {server}");
            }
            RegistryCommand::Logout { server } => {
                let _: serde_json::Value = client
                    .post("/registry/logout", &serde_json::json!({ "server": server }))
                    .await?;
                println!("Removed credentials for {server}");
            }
        }
        Ok(())
    }
}

/// Reads a line from the terminal with echo off.
fn read_password(prompt: &str) -> anyhow::Result<String> {
    use nix::sys::termios::{self, LocalFlags, SetArg};
    eprint!("{prompt}");
    let stdin = std::io::stdin();
    let saved = termios::tcgetattr(&stdin)?;
    let mut quiet = saved.clone();
    quiet.local_flags.remove(LocalFlags::ECHO);
    termios::tcsetattr(&stdin, SetArg::TCSANOW, &quiet)?;
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    termios::tcsetattr(&stdin, SetArg::TCSANOW, &saved)?;
    eprintln!();
    read?;
    Ok(line.trim_end_matches(['\n', '\r']).to_string())
}
