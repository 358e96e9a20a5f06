//! `container machine ssh-config` and `ssh-proxy`: OpenSSH (and editors that use it, such as
//! VS Code's Remote-SSH) reach a machine's sshd through the service, never through the
//! machine network: `ProxyCommand container machine ssh-proxy NAME` carries ssh's bytes to
//! port 22 on the machine's loopback over the agent's vsock session, so it works with
//! `--network none` and from hosts that cannot route to the bridge.
//!
//! Keys and trust, all under `~/.config/container/ssh/` (`$XDG_CONFIG_HOME` honoured):
//! - `id_ed25519`: a key of the user's own for machines, made with `ssh-keygen` on first use.
//!   `ssh-proxy` authorises it in the machine, as root through the `run` path, in a file of
//!   the machine's own, `/etc/ssh/container_authorized_keys/USER` (root's, 0644), which a
//!   drop-in `/etc/ssh/sshd_config.d/container.conf` adds to sshd's `AuthorizedKeysFile`
//!   (sshd reloaded when the drop-in is new). The user's `~/.ssh/authorized_keys` is left
//!   alone: with the home shared, it is the host's file.
//! - `known_hosts`: the machine's host keys, read from `/etc/ssh/ssh_host_*_key.pub` through
//!   the same authenticated path at each `ssh-proxy`, and written under the entry's names
//!   before ssh checks them, so `StrictHostKeyChecking yes` holds, and a machine made again
//!   under an old name is trusted with its new keys without a warning to click through.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use container_api::machine::{ConnectRequest, Machine, RunRequest};
use container_api::session::Frame;
use container_api::{Client, ExitCode};

use crate::exit::failed;

/// The guest port ssh-proxy connects to.
const SSH_PORT: u16 = 22;
/// How long ssh-proxy waits for a machine's sshd to accept (a machine still booting).
const SSHD_WAIT: std::time::Duration = std::time::Duration::from_secs(60);
/// The prefix of each machine's short host alias: `container-NAME`.
const ALIAS_PREFIX: &str = "container-";

#[derive(Debug, Args)]
#[command(
    after_help = "Each entry is `Host NAME.machine container-NAME` (the second name \
                  works for machines without a network); `ssh dev.machine` or `ssh \
                  container-dev` then reaches machine dev's sshd through the service \
                  (ProxyCommand `container machine ssh-proxy dev`), as your user, with a key \
                  of its own in ~/.config/container/ssh/ that the first connection authorises \
                  in the machine. The machine needs an sshd (openssh-server).\n\n\
                  With --install, the entries go to ~/.config/container/ssh_config, with a \
                  catch-all for machines made later, and ~/.ssh/config includes that file \
                  (one `Include` line at its top, added once). Editors that read \
                  ~/.ssh/config, such as VS Code's Remote-SSH, list the machines."
)]
pub struct SshConfigArgs {
    /// Machines (default: all of yours).
    names: Vec<String>,
    /// Write the entries to ~/.config/container/ssh_config and include it from ~/.ssh/config,
    /// instead of printing them.
    #[arg(long)]
    install: bool,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Meant as ssh's ProxyCommand (see `container machine ssh-config`): \
                  boots the machine if it is stopped, authorises your machine key there, \
                  records its host keys, then carries stdin and stdout to port 22 inside it."
)]
pub struct SshProxyArgs {
    /// The machine: NAME, NAME.machine or container-NAME.
    name: String,
}

/// `~/.config/container` (`$XDG_CONFIG_HOME/container`).
fn config_dir() -> anyhow::Result<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME").filter(|x| !x.is_empty()) {
        return Ok(PathBuf::from(x).join("container"));
    }
    Ok(home()?.join(".config/container"))
}

fn home() -> anyhow::Result<PathBuf> {
    if let Some(h) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(h));
    }
    let user = nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .context("no home directory: set HOME")?;
    Ok(user.dir)
}

/// The files of the machine key and the trusted host keys.
#[derive(Debug, Clone)]
struct Keys {
    dir: PathBuf,
}

impl Keys {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            dir: config_dir()?.join("ssh"),
        })
    }
    fn identity(&self) -> PathBuf {
        self.dir.join("id_ed25519")
    }
    fn known_hosts(&self) -> PathBuf {
        self.dir.join("known_hosts")
    }

    /// Makes the key pair with `ssh-keygen` unless it exists; returns the public key line.
    fn ensure(&self) -> anyhow::Result<String> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        let public = self.identity().with_extension("pub");
        if !self.identity().exists() {
            let comment = format!(
                "container@{}",
                nix::unistd::gethostname()
                    .map(|h| h.to_string_lossy().into_owned())
                    .unwrap_or_default()
            );
            let out = std::process::Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", &comment, "-f"])
                .arg(self.identity())
                .stdin(std::process::Stdio::null())
                .output()
                .context("running ssh-keygen (install openssh-client)")?;
            if !out.status.success() {
                anyhow::bail!(
                    "ssh-keygen could not make {}: {}",
                    self.identity().display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        let key = std::fs::read_to_string(&public)
            .with_context(|| format!("reading {}", public.display()))?;
        Ok(key.trim().to_string())
    }
}

/// The machine a host name given to ssh-proxy means: `dev`, `dev.machine` (any domain) or
/// `container-dev`. Machine names have no dots, so the first label is the name.
fn machine_of(host: &str) -> &str {
    let host = host.strip_prefix(ALIAS_PREFIX).unwrap_or(host);
    host.split('.').next().unwrap_or(host)
}

/// A value for ssh_config, quoted when it holds spaces.
fn quoted(value: &str) -> String {
    if value.contains([' ', '\t']) {
        format!("\"{value}\"")
    } else {
        value.to_string()
    }
}

/// What an entry needs to know.
#[derive(Debug, Clone, PartialEq)]
struct EntryPaths {
    /// The `container` binary ssh runs (absolute, so editors with another PATH find it).
    container: String,
    identity: String,
    known_hosts: String,
}

impl EntryPaths {
    fn options(&self, proxy_arg: &str) -> String {
        format!(
            "  ProxyCommand {} machine ssh-proxy {proxy_arg}\n  \
             IdentityFile {}\n  IdentitiesOnly yes\n  UserKnownHostsFile {}\n  \
             StrictHostKeyChecking yes\n",
            quoted(&self.container),
            quoted(&self.identity),
            quoted(&self.known_hosts),
        )
    }
}

/// The host names of a machine's entry: `NAME.DOMAIN` when it has a network, and
/// `container-NAME`.
fn host_names(machine: &Machine) -> Vec<String> {
    machine
        .dns_name
        .iter()
        .cloned()
        .chain([format!("{ALIAS_PREFIX}{}", machine.id)])
        .collect()
}

/// One `Host` entry.
fn entry(machine: &Machine, paths: &EntryPaths) -> String {
    format!(
        "Host {}\n  User {}\n{}",
        host_names(machine).join(" "),
        machine.user_setup.username,
        paths.options(&machine.id)
    )
}

/// The catch-all for machines made after the file was written (`%n`: the name as typed).
fn catch_all(domain: &str, paths: &EntryPaths) -> String {
    format!("Host *.{domain} {ALIAS_PREFIX}*\n{}", paths.options("%n"))
}

/// `~/.ssh/config` with `line` at its top, once.
fn with_include(current: &str, line: &str) -> Option<String> {
    if current.lines().any(|l| l.trim() == line) {
        return None;
    }
    Some(format!("{line}\n\n{current}"))
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("writing {}", path.display()))?;
    tmp.write_all(text.as_bytes())?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o600))?;
    tmp.persist(path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

pub async fn config(client: &Client, args: SshConfigArgs) -> anyhow::Result<()> {
    let uid = nix::unistd::getuid().as_raw();
    let machines: Vec<Machine> = if args.names.is_empty() {
        let all: Vec<Machine> = client.get("/machines").await?;
        // Root lists everyone's; its entries are for its own.
        all.into_iter().filter(|m| m.owner_uid == uid).collect()
    } else {
        let mut list = Vec::new();
        for n in &args.names {
            list.push(client.get(&format!("/machines/{n}")).await?);
        }
        list
    };
    let keys = Keys::new()?;
    keys.ensure()?;
    let container = std::env::current_exe()
        .context("finding the container binary")?
        .display()
        .to_string();
    let paths = EntryPaths {
        container,
        identity: keys.identity().display().to_string(),
        known_hosts: keys.known_hosts().display().to_string(),
    };
    let mut text =
        String::from("# Machines of `container` (made by `container machine ssh-config`).\n");
    for m in &machines {
        text.push('\n');
        text.push_str(&entry(m, &paths));
    }
    if !args.install {
        print!("{text}");
        return Ok(());
    }
    let domain = machines
        .iter()
        .find_map(|m| {
            m.dns_name
                .as_deref()?
                .split_once('.')
                .map(|(_, d)| d.to_string())
        })
        .unwrap_or_else(|| "machine".into());
    text.push('\n');
    text.push_str(&catch_all(&domain, &paths));
    let file = config_dir()?.join("ssh_config");
    write_private(&file, &text)?;
    let ssh_dir = home()?.join(".ssh");
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&ssh_dir)
            .with_context(|| format!("creating {}", ssh_dir.display()))?;
    }
    let user_config = ssh_dir.join("config");
    let current = match std::fs::read_to_string(&user_config) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", user_config.display())),
    };
    let include = format!("Include {}", quoted(&file.display().to_string()));
    if let Some(next) = with_include(&current, &include) {
        write_private(&user_config, &next)?;
        println!("added `{include}` to {}", user_config.display());
    }
    println!(
        "wrote {} ({} machines): ssh {}",
        file.display(),
        machines.len(),
        machines
            .first()
            .and_then(|m| host_names(m).into_iter().next())
            .unwrap_or_else(|| format!("NAME.{domain}"))
    );
    Ok(())
}

/// What ssh-proxy runs as root in the machine, with the user name and the public key as `$1`
/// and `$2`: authorise the key for the user in a file of the machine's own, make sshd read
/// that file (reloaded when the drop-in is new), then print the host keys (made by sshd at
/// its first start, so waited for).
const PREPARE: &str = r#"set -e
user=$1 key=$2
if ! command -v sshd >/dev/null 2>&1 && [ ! -x /usr/sbin/sshd ]; then
  echo "there is no sshd in this machine: install openssh-server in it" >&2
  exit 3
fi
dir=/etc/ssh/container_authorized_keys
mkdir -p "$dir" && chmod 755 "$dir"
touch "$dir/$user"
grep -qxF "$key" "$dir/$user" || printf '%s\n' "$key" >> "$dir/$user"
chown 0:0 "$dir/$user" && chmod 644 "$dir/$user"
want='AuthorizedKeysFile .ssh/authorized_keys .ssh/authorized_keys2 /etc/ssh/container_authorized_keys/%u'
conf=/etc/ssh/sshd_config.d/container.conf
if [ "$(cat "$conf" 2>/dev/null)" != "$want" ]; then
  mkdir -p /etc/ssh/sshd_config.d
  printf '%s\n' "$want" > "$conf"
  grep -qiE '^[[:space:]]*Include[[:space:]]+/etc/ssh/sshd_config\.d' /etc/ssh/sshd_config 2>/dev/null \
    || sed -i '1i Include /etc/ssh/sshd_config.d/*.conf' /etc/ssh/sshd_config
  if [ -s /run/sshd.pid ]; then kill -HUP "$(cat /run/sshd.pid)" 2>/dev/null || true; sleep 0.3; fi
fi
i=0
until ls /etc/ssh/ssh_host_*_key.pub >/dev/null 2>&1; do
  i=$((i + 1)); [ $i -lt 300 ] || { echo "sshd made no host keys" >&2; exit 4; }
  sleep 0.2
done
cat /etc/ssh/ssh_host_*_key.pub
"#;

/// Runs `argv` as root in the machine, standard input closed; returns (status, stdout,
/// stderr).
async fn run_as_root(
    client: &Client,
    name: &str,
    argv: Vec<String>,
) -> anyhow::Result<(i32, Vec<u8>, Vec<u8>)> {
    let request = RunRequest {
        command: argv,
        no_shell: true,
        env: Vec::new(),
        workdir: Some("/".into()),
        caller_cwd: None,
        root: true,
        user: None,
        uid: None,
        gid: None,
        tty: false,
        interactive: false,
        detach: false,
        rows: None,
        cols: None,
        ssh_auth_sock: None,
    };
    let io = client
        .upgrade(&format!("/machines/{name}/exec"), &request)
        .await?;
    let (mut reader, mut writer) = tokio::io::split(io);
    Frame::StdinEof.write(&mut writer).await?;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    loop {
        match Frame::read(&mut reader).await? {
            Some(Frame::Stdout(b)) => out.extend(b),
            Some(Frame::Stderr(b)) => err.extend(b),
            Some(Frame::Started { .. }) => {}
            Some(Frame::Exit(status)) => return Ok((status.shell_code(), out, err)),
            Some(Frame::Error(e)) => return Err(e.into()),
            Some(other) => anyhow::bail!("unexpected frame from the service: {other:?}"),
            None => anyhow::bail!("the connection to machine {name} closed early"),
        }
    }
}

/// `known_hosts` with the lines of `hosts` replaced by `keys` (`TYPE BASE64 [COMMENT]` lines).
fn known_hosts_with(current: &str, hosts: &[String], keys: &str) -> String {
    let pattern = hosts.join(",");
    let mut out: String = current
        .lines()
        .filter(|l| l.split_whitespace().next() != Some(pattern.as_str()))
        .map(|l| format!("{l}\n"))
        .collect();
    for key in keys
        .lines()
        .filter(|l| l.starts_with("ssh-") || l.starts_with("ecdsa-"))
    {
        let mut words = key.split_whitespace();
        if let (Some(kind), Some(blob)) = (words.next(), words.next()) {
            out.push_str(&format!("{pattern} {kind} {blob}\n"));
        }
    }
    out
}

/// Records `keys` for `hosts`, under a lock (several ssh-proxy may run at once).
fn record_host_keys(keys_dir: &Keys, hosts: &[String], keys: &str) -> anyhow::Result<()> {
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(keys_dir.dir.join("known_hosts.lock"))?;
    let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .context("locking known_hosts")?;
    let path = keys_dir.known_hosts();
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    let next = known_hosts_with(&current, hosts, keys);
    if next != current {
        write_private(&path, &next)?;
    }
    Ok(())
}

pub async fn proxy(client: &Client, args: SshProxyArgs) -> anyhow::Result<()> {
    let name = machine_of(&args.name).to_string();
    let machine: Machine = client.get(&format!("/machines/{name}")).await?;
    let keys = Keys::new()?;
    let public = keys.ensure()?;
    let argv = [
        "/bin/sh",
        "-c",
        PREPARE,
        "sh",
        &machine.user_setup.username,
        &public,
    ]
    .map(String::from)
    .to_vec();
    let (code, out, err) = run_as_root(client, &name, argv).await?;
    if code != 0 {
        return Err(failed(
            ExitCode::Failure,
            format!(
                "machine `{name}` is not ready for ssh: {}",
                String::from_utf8_lossy(&err).trim()
            ),
        ));
    }
    // Under the names of the machine's entry, either of which ssh checks.
    record_host_keys(&keys, &host_names(&machine), &String::from_utf8_lossy(&out))?;

    let deadline = std::time::Instant::now() + SSHD_WAIT;
    let io = loop {
        match client
            .upgrade(
                &format!("/machines/{name}/connect"),
                &ConnectRequest { port: SSH_PORT },
            )
            .await
        {
            Ok(io) => break io,
            // sshd may be starting (a machine just booted) or reloading.
            Err(e) if std::time::Instant::now() < deadline => {
                debug_note(&e);
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    let (mut from_guest, mut to_guest) = tokio::io::split(io);
    let up = async {
        let mut stdin = tokio::io::stdin();
        let _ = tokio::io::copy(&mut stdin, &mut to_guest).await;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut to_guest).await;
    };
    let down = async {
        let mut stdout = tokio::io::stdout();
        let _ = tokio::io::copy(&mut from_guest, &mut stdout).await;
        let _ = tokio::io::AsyncWriteExt::flush(&mut stdout).await;
    };
    // Each direction ends on its own: ssh closes our stdin when it is done sending, the
    // guest's sshd closes its side when the session ends.
    tokio::join!(up, down);
    Ok(())
}

/// ssh shows a ProxyCommand's stderr: stay quiet unless asked.
fn debug_note(e: &dyn std::fmt::Display) {
    if std::env::var_os("CONTAINER_SSH_DEBUG").is_some() {
        eprintln!("container ssh-proxy: {e}; retrying");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(json: serde_json::Value) -> Machine {
        let mut base = serde_json::json!({
            "id": "dev", "status": "running", "default": true, "cpus": 1, "memory": 1,
            "diskSize": 1, "diskAllocated": 0, "homeMount": "rw",
            "createdDate": "2026-12-01T00:00:00Z",
            "image": { "reference": "debian", "digest": "sha256:00" }, "platform": { "os": "linux", "architecture": "amd64" },
            "userSetup": { "username": "alice", "uid": 1000, "gid": 1000, "home": "/home/alice", "shell": "/bin/bash" },
            "mounts": [], "network": "default", "ownerUid": 1000,
        });
        for (k, v) in json.as_object().unwrap() {
            base[k] = v.clone();
        }
        serde_json::from_value(base).unwrap()
    }

    fn paths() -> EntryPaths {
        EntryPaths {
            container: "/usr/local/bin/container".into(),
            identity: "/home/alice/.config/container/ssh/id_ed25519".into(),
            known_hosts: "/home/alice/My Files/known_hosts".into(),
        }
    }

    #[test]
    fn an_entry_names_the_machine_both_ways_and_goes_through_the_service() {
        let m = machine(serde_json::json!({ "dnsName": "dev.machine" }));
        assert_eq!(
            entry(&m, &paths()),
            "Host dev.machine container-dev\n  User alice\n  \
             ProxyCommand /usr/local/bin/container machine ssh-proxy dev\n  \
             IdentityFile /home/alice/.config/container/ssh/id_ed25519\n  \
             IdentitiesOnly yes\n  \
             UserKnownHostsFile \"/home/alice/My Files/known_hosts\"\n  \
             StrictHostKeyChecking yes\n"
        );
        // Without a network there is no DNS name; the alias still works (no IP needed).
        let offline = machine(serde_json::json!({ "id": "off", "network": "none" }));
        assert!(entry(&offline, &paths()).starts_with("Host container-off\n"));
        assert!(
            catch_all("machine", &paths())
                .starts_with("Host *.machine container-*\n  ProxyCommand /usr/local/bin/container machine ssh-proxy %n\n")
        );
    }

    #[test]
    fn the_proxy_takes_any_of_the_names() {
        for given in ["dev", "dev.machine", "container-dev", "dev.vm.internal"] {
            assert_eq!(machine_of(given), "dev", "{given}");
        }
    }

    #[test]
    fn the_include_line_is_added_once_at_the_top() {
        let line = "Include /home/alice/.config/container/ssh_config";
        let first = with_include("Host x\n  User y\n", line).unwrap();
        assert_eq!(first, format!("{line}\n\nHost x\n  User y\n"));
        assert_eq!(with_include(&first, line), None);
        assert_eq!(with_include("", line).unwrap(), format!("{line}\n\n"));
    }

    #[test]
    fn host_keys_replace_the_machines_old_ones_only() {
        let hosts = vec!["dev.machine".to_string(), "container-dev".to_string()];
        let current = "dev.machine,container-dev ssh-ed25519 OLD\nother.machine,container-other ssh-ed25519 KEEP\n";
        let keys = "ssh-ed25519 NEW root@dev\necdsa-sha2-nistp256 EC root@dev\nnoise\n";
        assert_eq!(
            known_hosts_with(current, &hosts, keys),
            "other.machine,container-other ssh-ed25519 KEEP\n\
             dev.machine,container-dev ssh-ed25519 NEW\n\
             dev.machine,container-dev ecdsa-sha2-nistp256 EC\n"
        );
    }
}
