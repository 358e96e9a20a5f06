//! Pointing the host's resolver at the machines' names, one of two ways:
//!
//! - **systemd-resolved** (when it runs): the bridge gets the responder on its gateway as its
//!   per-link DNS server and `~DOMAIN` as its routing-only domain, so only names under the
//!   domain go there, and it is never the default route for other names. Set with
//!   `resolvectl` each time the responder starts listening on the bridge (resolved forgets
//!   per-link settings when the link goes or resolved restarts). [`resolvectl_commands`] is
//!   the exact list, unit-tested; the commands run through a [`Commands`] seam.
//! - **The hosts file** (`/etc/hosts` unless `[network] hosts-file` or the service's
//!   `--hosts-file` says otherwise): a block between [`BEGIN`] and [`END`] lists
//!   `ADDRESS NAME.DOMAIN` for every machine with an address, rewritten whole and atomically
//!   (a temporary beside it, fsync, rename over it, keeping its mode) whenever the names
//!   change, and left alone when they did not. Lines outside the block are kept as they are.
//!   `scripts/uninstall.sh` removes the block.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use async_trait::async_trait;

/// First and last lines of the managed block in the hosts file.
pub const BEGIN: &str = "# BEGIN container machines";
pub const END: &str = "# END container machines";
/// Where systemd-resolved's varlink socket is while it runs.
pub const RESOLVED_SOCKET: &str = "/run/systemd/resolve/io.systemd.Resolve";

/// Why the host's resolver could not be told.
#[derive(Debug, thiserror::Error)]
pub enum HostNamesError {
    #[error("writing the machine names into {}", path.display())]
    HostsFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("running `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
}

/// How the host learns the names: told when the responder listens on the bridge, and when
/// the set of names and addresses changes.
#[async_trait]
pub trait HostNames: Send + Sync + std::fmt::Debug {
    /// What this is, for the log.
    fn describe(&self) -> String;
    /// The responder listens on `gateway`, the address of `bridge`.
    async fn link_up(&self, bridge: &str, gateway: Ipv4Addr) -> Result<(), HostNamesError>;
    /// Every machine's name and address, now (sorted by name).
    fn names(&self, names: &[(String, Ipv4Addr)]) -> Result<(), HostNamesError>;
}

/// The host is not told (`[network] host-names = "none"`).
#[derive(Debug)]
pub struct NoHostNames;

#[async_trait]
impl HostNames for NoHostNames {
    fn describe(&self) -> String {
        "none".into()
    }
    async fn link_up(&self, _: &str, _: Ipv4Addr) -> Result<(), HostNamesError> {
        Ok(())
    }
    fn names(&self, _: &[(String, Ipv4Addr)]) -> Result<(), HostNamesError> {
        Ok(())
    }
}

/// Runs a program with arguments and waits for it.
#[async_trait]
pub trait Commands: Send + Sync + std::fmt::Debug {
    async fn run(&self, argv: &[String]) -> Result<(), HostNamesError>;
}

/// The real thing: the program found on the service's `PATH`, a clean environment.
#[derive(Debug)]
pub struct RealCommands;

#[async_trait]
impl Commands for RealCommands {
    async fn run(&self, argv: &[String]) -> Result<(), HostNamesError> {
        let command = argv.join(" ");
        let out = tokio::process::Command::new(&argv[0])
            .args(&argv[1..])
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("LANG", "C")
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(|source| HostNamesError::Spawn {
                command: command.clone(),
                source,
            })?;
        if !out.status.success() {
            return Err(HostNamesError::Command {
                command,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(())
    }
}

/// Whether systemd-resolved runs here (its varlink socket exists).
pub fn resolved_running() -> bool {
    Path::new(RESOLVED_SOCKET).exists()
}

/// The commands that make the bridge's responder the resolver for `~DOMAIN` only.
pub fn resolvectl_commands(bridge: &str, gateway: Ipv4Addr, domain: &str) -> Vec<Vec<String>> {
    let argv = |words: &[&str]| words.iter().map(|w| w.to_string()).collect::<Vec<_>>();
    vec![
        argv(&["resolvectl", "dns", bridge, &gateway.to_string()]),
        argv(&["resolvectl", "domain", bridge, &format!("~{domain}")]),
        argv(&["resolvectl", "default-route", bridge, "false"]),
    ]
}

/// systemd-resolved's per-link settings on the bridge.
#[derive(Debug)]
pub struct Resolved {
    pub domain: String,
    pub commands: Box<dyn Commands>,
}

#[async_trait]
impl HostNames for Resolved {
    fn describe(&self) -> String {
        format!("systemd-resolved (~{})", self.domain)
    }
    async fn link_up(&self, bridge: &str, gateway: Ipv4Addr) -> Result<(), HostNamesError> {
        for argv in resolvectl_commands(bridge, gateway, &self.domain) {
            self.commands.run(&argv).await?;
        }
        Ok(())
    }
    fn names(&self, _: &[(String, Ipv4Addr)]) -> Result<(), HostNamesError> {
        // resolved asks the responder, which reads the live names.
        Ok(())
    }
}

/// The text of a hosts file with the managed block replaced by one for `names` (removed when
/// there are none); everything else is kept, line for line.
pub fn render_hosts(current: &str, names: &[(String, Ipv4Addr)], domain: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for line in current.lines() {
        match line.trim() {
            l if l == BEGIN => inside = true,
            l if l == END && inside => inside = false,
            _ if inside => {}
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    if !names.is_empty() {
        out.push_str(BEGIN);
        out.push('\n');
        for (name, ip) in names {
            out.push_str(&format!("{ip}\t{name}.{domain}\n"));
        }
        out.push_str(END);
        out.push('\n');
    }
    out
}

/// The managed block in a hosts file.
#[derive(Debug)]
pub struct HostsFile {
    pub path: PathBuf,
    pub domain: String,
}

impl HostsFile {
    /// Replaces the file by `text`: a temporary beside it with the file's mode, fsynced,
    /// renamed over it, the directory fsynced. A hosts file that is a mount point (containers
    /// bind-mount it; rename fails with EBUSY) is rewritten in place instead.
    fn replace(&self, text: &str) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&self.path)
            .map(|m| m.permissions().mode() & 0o7777)
            .unwrap_or(0o644);
        let dir = self.path.parent().unwrap_or(Path::new("/"));
        let mut tmp = tempfile::Builder::new()
            .prefix(".hosts.container-")
            .tempfile_in(dir)?;
        tmp.write_all(text.as_bytes())?;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(mode))?;
        tmp.as_file().sync_all()?;
        match tmp.persist(&self.path) {
            Ok(_) => {}
            Err(e) if e.error.raw_os_error() == Some(libc::EBUSY) => {
                std::fs::write(&self.path, text)?;
            }
            Err(e) => return Err(e.error),
        }
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

#[async_trait]
impl HostNames for HostsFile {
    fn describe(&self) -> String {
        format!("the hosts file {}", self.path.display())
    }
    async fn link_up(&self, _: &str, _: Ipv4Addr) -> Result<(), HostNamesError> {
        Ok(())
    }
    fn names(&self, names: &[(String, Ipv4Addr)]) -> Result<(), HostNamesError> {
        let error = |source| HostNamesError::HostsFile {
            path: self.path.clone(),
            source,
        };
        let current = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(error(e)),
        };
        let next = render_hosts(&current, names, &self.domain);
        if next == current {
            return Ok(());
        }
        self.replace(&next).map_err(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[(&str, [u8; 4])]) -> Vec<(String, Ipv4Addr)> {
        list.iter()
            .map(|(n, ip)| (n.to_string(), Ipv4Addr::from(*ip)))
            .collect()
    }

    const HOSTS: &str =
        "127.0.0.1\tlocalhost\n::1 localhost ip6-localhost\n# a comment\n10.0.0.9 nas\n";

    #[test]
    fn the_block_is_added_after_the_other_lines_and_kept_apart() {
        let text = render_hosts(HOSTS, &names(&[("dev", [192, 168, 64, 2])]), "machine");
        assert_eq!(
            text,
            format!("{HOSTS}{BEGIN}\n192.168.64.2\tdev.machine\n{END}\n")
        );
    }

    #[test]
    fn rewriting_is_idempotent_and_follows_changes() {
        let two = names(&[("db", [192, 168, 64, 3]), ("dev", [192, 168, 64, 2])]);
        let once = render_hosts(HOSTS, &two, "machine");
        assert_eq!(render_hosts(&once, &two, "machine"), once);
        // A rename and an rm: only the block changes.
        let renamed = render_hosts(&once, &names(&[("web", [192, 168, 64, 3])]), "machine");
        assert_eq!(
            renamed,
            format!("{HOSTS}{BEGIN}\n192.168.64.3\tweb.machine\n{END}\n")
        );
        // No names left: the block goes, the rest is as it was.
        assert_eq!(render_hosts(&renamed, &[], "machine"), HOSTS);
    }

    #[test]
    fn lines_around_the_block_stay_where_they_are() {
        let text = format!("a\n{BEGIN}\n1.2.3.4\told.machine\n{END}\nb\n# END other\n");
        let next = render_hosts(&text, &names(&[("x", [192, 168, 64, 5])]), "vm.test");
        assert_eq!(
            next,
            format!("a\nb\n# END other\n{BEGIN}\n192.168.64.5\tx.vm.test\n{END}\n")
        );
        // A file without a final newline keeps its last line whole.
        assert_eq!(
            render_hosts("127.0.0.1 localhost", &[], "machine"),
            "127.0.0.1 localhost\n"
        );
    }

    #[test]
    fn the_hosts_file_is_replaced_keeping_its_mode_and_only_on_change() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hosts");
        std::fs::write(&path, HOSTS).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let file = HostsFile {
            path: path.clone(),
            domain: "machine".into(),
        };
        let list = names(&[("dev", [192, 168, 64, 2])]);
        file.names(&list).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with(HOSTS) && text.contains("192.168.64.2\tdev.machine\n"));
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o644);
        // Nothing changed: the file is not replaced (same inode).
        let inode = std::fs::metadata(&path).unwrap().ino();
        file.names(&list).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), inode);
        file.names(&[]).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), HOSTS);
        // No temporary is left beside it.
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1);
    }

    #[test]
    fn resolved_gets_a_routing_only_domain_on_the_bridge() {
        assert_eq!(
            resolvectl_commands("container0", Ipv4Addr::new(192, 168, 64, 1), "machine"),
            [
                vec!["resolvectl", "dns", "container0", "192.168.64.1"],
                vec!["resolvectl", "domain", "container0", "~machine"],
                vec!["resolvectl", "default-route", "container0", "false"],
            ]
        );
    }

    /// Records the commands it is asked to run; fails the one named `fail`.
    #[derive(Debug, Default)]
    struct Recorder {
        ran: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
        fail: Option<&'static str>,
    }

    #[async_trait]
    impl Commands for Recorder {
        async fn run(&self, argv: &[String]) -> Result<(), HostNamesError> {
            let command = argv.join(" ");
            self.ran.lock().unwrap().push(command.clone());
            if self.fail.is_some_and(|f| command.contains(f)) {
                return Err(HostNamesError::Command {
                    command,
                    stderr: "Failed to resolve interface".into(),
                });
            }
            Ok(())
        }
    }

    #[tokio::test]
    async fn resolved_is_told_when_the_link_comes_up() {
        let ran = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let resolved = Resolved {
            domain: "machine".into(),
            commands: Box::new(Recorder {
                ran: ran.clone(),
                fail: None,
            }),
        };
        resolved
            .link_up("container0", Ipv4Addr::new(10, 9, 0, 1))
            .await
            .unwrap();
        // Names alone change nothing there: resolved asks the responder.
        resolved.names(&names(&[("dev", [10, 9, 0, 2])])).unwrap();
        assert_eq!(
            *ran.lock().unwrap(),
            [
                "resolvectl dns container0 10.9.0.1",
                "resolvectl domain container0 ~machine",
                "resolvectl default-route container0 false",
            ]
        );
        let failing = Resolved {
            domain: "machine".into(),
            commands: Box::new(Recorder {
                ran: Default::default(),
                fail: Some("domain"),
            }),
        };
        let e = failing
            .link_up("container0", Ipv4Addr::new(10, 9, 0, 1))
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("resolvectl domain container0 ~machine")
        );
    }
}
