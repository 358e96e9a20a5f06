//! First-boot setup of the machine user: the image's `/etc/machine/create-user.sh` when it has
//! an executable one, else the built-in setup: passwd, group and shadow entries with the
//! host's name, uid, gid and shell, admin group membership, the sudoers drop-in
//! `/etc/sudoers.d/<user>` (dots as `_`), and (with no home share) a home from /etc/skel.
//! Accounts of the image that hold the user's name, uid or gid (Ubuntu's `ubuntu` at 1000)
//! give way. Done once: the marker is written only on success, so a failed setup is retried
//! at the next boot.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context, Result, bail};
use container_agent_proto::{BootConfig, HomeMount, UserSpec};

const MARKER: &str = "var/lib/container-agent/provisioned";
const SCRIPT: &str = "etc/machine/create-user.sh";
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Sets the user up in the tree at `root` unless done before; true when it did something.
/// The image's script only runs when `root` is `/` (it runs in the machine's root).
pub fn provision(cfg: &BootConfig, root: &Path) -> Result<bool> {
    let Some(user) = &cfg.user else {
        return Ok(false);
    };
    let marker = root.join(MARKER);
    if let Ok(text) = std::fs::read_to_string(&marker) {
        // The marker's second line is the identity of the machine that did the setup.
        let recorded = text.lines().nth(1).unwrap_or("");
        if cfg.instance_id.is_empty() || recorded == cfg.instance_id {
            return Ok(false);
        }
        if recorded.is_empty() {
            // Set up before identities were recorded: this machine's own disk.
            std::fs::write(&marker, format!("{}\n{}\n", user.name, cfg.instance_id))
                .context("updating the setup marker")?;
            return Ok(false);
        }
        // A copy of another machine's disk (a clone): a machine-id of its own, and the setup
        // again for this machine's owner.
        renew_machine_id(root, &cfg.instance_id)?;
    }
    let script = root.join(SCRIPT);
    let scripted = script
        .metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if scripted {
        let status = std::process::Command::new(&script)
            .env_clear()
            .env("PATH", PATH)
            .env("CONTAINER_USER", &user.name)
            .env("CONTAINER_UID", user.uid.to_string())
            .env("CONTAINER_GID", user.gid.to_string())
            .env("CONTAINER_HOME", &user.home)
            .env("CONTAINER_SHELL", &user.shell)
            .env("CONTAINER_MACHINE_ID", &cfg.machine_id)
            .current_dir(root)
            .status()
            .with_context(|| format!("running /{SCRIPT}"))?;
        if !status.success() {
            bail!("/{SCRIPT} failed ({status})");
        }
    } else {
        builtin(root, user, cfg.home_mount)?;
    }
    let dir = marker.parent().expect("the marker has a parent");
    std::fs::create_dir_all(dir).context("creating /var/lib/container-agent")?;
    let text = match cfg.instance_id.as_str() {
        "" => format!("{}\n", user.name),
        id => format!("{}\n{id}\n", user.name),
    };
    std::fs::write(&marker, text).context("writing the setup marker")?;
    Ok(true)
}

/// Gives a copied machine its own /etc/machine-id (systemd's and D-Bus's identity of the
/// host), when the image keeps one; an image without one leaves it to its init.
fn renew_machine_id(root: &Path, instance_id: &str) -> Result<()> {
    let path = root.join("etc/machine-id");
    match std::fs::read_to_string(&path) {
        Ok(old) if !old.trim().is_empty() => {
            std::fs::write(&path, format!("{instance_id}\n")).context("writing /etc/machine-id")
        }
        _ => Ok(()),
    }
}

/// The account databases of an image, as text.
#[derive(Debug, Clone, Default, PartialEq)]
struct Accounts {
    passwd: String,
    group: String,
    shadow: Option<String>,
    gshadow: Option<String>,
}

fn field(line: &str, n: usize) -> &str {
    line.split(':').nth(n).unwrap_or("")
}

fn join(lines: impl IntoIterator<Item = String>) -> String {
    lines.into_iter().map(|l| l + "\n").collect()
}

impl Accounts {
    /// The databases with `user` in them: image accounts holding the name or uid are
    /// removed, the group holding the gid (or the name) is replaced by the user's, and the
    /// user joins the admin groups the image has.
    fn with_user(&self, user: &UserSpec, shell: &str) -> Accounts {
        let uid = user.uid.to_string();
        let gid = user.gid.to_string();
        let evicted: Vec<&str> = self
            .passwd
            .lines()
            .filter(|l| field(l, 0) == user.name || field(l, 2) == uid)
            .map(|l| field(l, 0))
            .collect();
        let gone = |name: &str| name == user.name || evicted.contains(&name);
        let passwd = self
            .passwd
            .lines()
            .filter(|l| !l.trim().is_empty() && !gone(field(l, 0)))
            .map(str::to_string)
            .chain([format!(
                "{}:x:{uid}:{gid}::{}:{shell}",
                user.name, user.home
            )]);
        let shadow = self.shadow.as_ref().map(|s| {
            join(
                s.lines()
                    .filter(|l| !l.trim().is_empty() && !gone(field(l, 0)))
                    .map(str::to_string)
                    .chain([format!("{}:!:19000:0:99999:7:::", user.name)]),
            )
        });
        let replaced: Vec<&str> = self
            .group
            .lines()
            .filter(|l| field(l, 2) == gid || field(l, 0) == user.name)
            .map(|l| field(l, 0))
            .collect();
        let group = self
            .group
            .lines()
            .filter(|l| !l.trim().is_empty() && !replaced.contains(&field(l, 0)))
            .map(|l| {
                let mut parts: Vec<String> = l.splitn(4, ':').map(str::to_string).collect();
                if parts.len() < 4 {
                    return l.to_string();
                }
                let mut members: Vec<String> = parts[3]
                    .split(',')
                    .filter(|m| !m.is_empty() && !gone(m))
                    .map(str::to_string)
                    .collect();
                if matches!(parts[0].as_str(), "sudo" | "wheel") {
                    members.push(user.name.clone());
                }
                parts[3] = members.join(",");
                parts.join(":")
            })
            .chain([format!("{}:x:{gid}:", user.name)]);
        let gshadow = self.gshadow.as_ref().map(|s| {
            join(
                s.lines()
                    .filter(|l| {
                        !l.trim().is_empty()
                            && !replaced.contains(&field(l, 0))
                            && field(l, 0) != user.name
                    })
                    .map(str::to_string)
                    .chain([format!("{}:!::", user.name)]),
            )
        });
        Accounts {
            passwd: join(passwd),
            group: join(group),
            shadow,
            gshadow,
        }
    }
}

/// Replaces a file atomically, keeping `mode`.
fn replace(path: &Path, text: &str, mode: u32) -> Result<()> {
    let tmp = path.with_extension("container-tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

/// The shell to give the user: theirs when the image has it, else bash, else sh.
fn pick_shell(root: &Path, wanted: &str) -> String {
    [wanted, "/bin/bash", "/bin/sh"]
        .into_iter()
        .find(|s| s.starts_with('/') && root.join(&s[1..]).exists())
        .unwrap_or("/bin/sh")
        .to_string()
}

fn builtin(root: &Path, user: &UserSpec, home_mount: HomeMount) -> Result<()> {
    let etc = root.join("etc");
    let read = |name: &str| std::fs::read_to_string(etc.join(name)).ok();
    let before = Accounts {
        passwd: read("passwd").unwrap_or_default(),
        group: read("group").unwrap_or_default(),
        shadow: read("shadow"),
        gshadow: read("gshadow"),
    };
    let after = before.with_user(user, &pick_shell(root, &user.shell));
    std::fs::create_dir_all(&etc).context("creating /etc")?;
    replace(&etc.join("passwd"), &after.passwd, 0o644)?;
    replace(&etc.join("group"), &after.group, 0o644)?;
    if let Some(s) = &after.shadow {
        replace(&etc.join("shadow"), s, 0o640)?;
    }
    if let Some(s) = &after.gshadow {
        replace(&etc.join("gshadow"), s, 0o640)?;
    }

    // As Apple's machines: `/etc/sudoers.d/<user>` (sudo skips drop-ins whose names contain a
    // dot, hence `_`), also on images without sudo yet, so a later `apk add sudo` just works.
    let sudoers_d = etc.join("sudoers.d");
    if !sudoers_d.is_dir() {
        std::fs::create_dir_all(&sudoers_d).context("creating /etc/sudoers.d")?;
        std::fs::set_permissions(&sudoers_d, std::fs::Permissions::from_mode(0o750))
            .context("setting the mode of /etc/sudoers.d")?;
    }
    let file_name = user.name.replace('.', "_");
    replace(
        &sudoers_d.join(&file_name),
        &format!("{} ALL=(ALL) NOPASSWD:ALL\n", user.name),
        0o440,
    )?;
    // Older agents named it `container-<user>`. Machines they set up are never set up again
    // and keep that file; a setup retried here leaves one drop-in, not two.
    match std::fs::remove_file(sudoers_d.join(format!("container-{file_name}"))) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).context("removing the older sudoers drop-in");
        }
        _ => {}
    }

    if home_mount == HomeMount::None {
        let home = root.join(user.home.trim_start_matches('/'));
        if !home.exists() {
            std::fs::create_dir_all(&home).with_context(|| format!("creating {}", user.home))?;
            std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o750))
                .with_context(|| format!("setting the mode of {}", user.home))?;
            copy_skel(&etc.join("skel"), &home)?;
            chown_tree(&home, user.uid, user.gid)?;
        }
    }
    Ok(())
}

fn copy_skel(from: &Path, to: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(from) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let dest = to.join(e.file_name());
        let ft = e.file_type().context("reading /etc/skel")?;
        if ft.is_dir() {
            std::fs::create_dir_all(&dest).context("copying /etc/skel")?;
            copy_skel(&e.path(), &dest)?;
        } else if ft.is_file() {
            std::fs::copy(e.path(), &dest).context("copying /etc/skel")?;
        } else if ft.is_symlink() {
            let target = std::fs::read_link(e.path()).context("copying /etc/skel")?;
            std::os::unix::fs::symlink(target, &dest).context("copying /etc/skel")?;
        }
    }
    Ok(())
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .with_context(|| format!("changing the owner of {}", path.display()))?;
    if path.is_dir() && !path.is_symlink() {
        for e in std::fs::read_dir(path)
            .context("reading the home")?
            .flatten()
        {
            chown_tree(&e.path(), uid, gid)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn alice() -> UserSpec {
        UserSpec {
            name: "alice.b".into(),
            uid: 1000,
            gid: 1000,
            home: "/home/alice.b".into(),
            shell: "/usr/bin/zsh".into(),
        }
    }

    fn config(home_mount: HomeMount) -> BootConfig {
        BootConfig {
            version: 1,
            machine_id: "m1".into(),
            instance_id: String::new(),
            hostname: "dev".into(),
            root_device: "/dev/vda".into(),
            grow_root: false,
            modules: vec![],
            shares: vec![],
            user: Some(alice()),
            home_mount,
            network: None,
            vsock_port: 1024,
            ready_port: 1025,
            time_unix_ns: 0,
            init: vec!["/sbin/init".into()],
        }
    }

    /// An Ubuntu-like image: `ubuntu` holds uid and gid 1000 and is in sudo.
    fn ubuntu_root() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc");
        std::fs::create_dir_all(etc.join("skel/.config")).unwrap();
        std::fs::create_dir_all(etc.join("sudoers.d")).unwrap();
        std::fs::create_dir_all(dir.path().join("bin")).unwrap();
        std::fs::write(dir.path().join("bin/bash"), "").unwrap();
        std::fs::write(dir.path().join("bin/sh"), "").unwrap();
        std::fs::write(
            etc.join("passwd"),
            "root:x:0:0:root:/root:/bin/bash\nubuntu:x:1000:1000:Ubuntu:/home/ubuntu:/bin/bash\n",
        )
        .unwrap();
        std::fs::write(
            etc.join("group"),
            "root:x:0:\nsudo:x:27:ubuntu\nubuntu:x:1000:\nusers:x:100:ubuntu,bob\n",
        )
        .unwrap();
        std::fs::write(
            etc.join("shadow"),
            "root:*:19000::::::\nubuntu:!:19000::::::\n",
        )
        .unwrap();
        std::fs::write(etc.join("skel/.bashrc"), "# skel\n").unwrap();
        std::fs::write(etc.join("skel/.config/x"), "x").unwrap();
        dir
    }

    fn read(root: &Path, p: &str) -> String {
        std::fs::read_to_string(root.join(p)).unwrap()
    }

    #[test]
    fn the_host_user_takes_over_uid_1000_with_sudo_and_a_home_from_skel() {
        let root = ubuntu_root();
        let r = root.path();
        assert!(provision(&config(HomeMount::None), r).unwrap());
        assert_eq!(
            read(r, "etc/passwd"),
            "root:x:0:0:root:/root:/bin/bash\nalice.b:x:1000:1000::/home/alice.b:/bin/bash\n"
        );
        assert_eq!(
            read(r, "etc/group"),
            "root:x:0:\nsudo:x:27:alice.b\nusers:x:100:bob\nalice.b:x:1000:\n"
        );
        assert_eq!(
            read(r, "etc/shadow"),
            "root:*:19000::::::\nalice.b:!:19000:0:99999:7:::\n"
        );
        let sudoers = r.join("etc/sudoers.d/alice_b");
        assert_eq!(
            read(r, "etc/sudoers.d/alice_b"),
            "alice.b ALL=(ALL) NOPASSWD:ALL\n"
        );
        assert_eq!(
            sudoers.metadata().unwrap().permissions().mode() & 0o777,
            0o440
        );
        assert_eq!(read(r, "home/alice.b/.bashrc"), "# skel\n");
        assert_eq!(read(r, "home/alice.b/.config/x"), "x");
        // Running as root here: the copied files belong to the user.
        if nix::unistd::geteuid().is_root() {
            let m = r.join("home/alice.b/.config/x").metadata().unwrap();
            assert_eq!((m.uid(), m.gid()), (1000, 1000));
        }
        assert_eq!(read(r, MARKER), "alice.b\n");
    }

    #[test]
    fn setup_happens_once() {
        let root = ubuntu_root();
        let r = root.path();
        assert!(provision(&config(HomeMount::None), r).unwrap());
        std::fs::write(r.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
        assert!(!provision(&config(HomeMount::None), r).unwrap());
        assert_eq!(read(r, "etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n");
    }

    #[test]
    fn a_shared_home_is_neither_created_nor_filled() {
        let root = ubuntu_root();
        let r = root.path();
        assert!(provision(&config(HomeMount::Rw), r).unwrap());
        assert!(!r.join("home/alice.b").exists());
    }

    #[test]
    fn a_failed_setup_is_not_marked_done() {
        let root = ubuntu_root();
        let r = root.path();
        std::fs::create_dir_all(r.join("etc/machine")).unwrap();
        std::fs::write(r.join(SCRIPT), "#!/bin/sh\nexit 3\n").unwrap();
        std::fs::set_permissions(r.join(SCRIPT), std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = provision(&config(HomeMount::None), r).unwrap_err();
        assert!(
            format!("{err:#}").contains("create-user.sh failed"),
            "{err:#}"
        );
        assert!(!r.join(MARKER).exists());
    }

    #[test]
    fn the_image_script_gets_the_user_in_its_environment() {
        let root = ubuntu_root();
        let r = root.path();
        std::fs::create_dir_all(r.join("etc/machine")).unwrap();
        std::fs::write(
            r.join(SCRIPT),
            "#!/bin/sh\necho \"$CONTAINER_USER $CONTAINER_UID $CONTAINER_GID $CONTAINER_HOME $CONTAINER_SHELL $CONTAINER_MACHINE_ID\" > seen\n",
        )
        .unwrap();
        std::fs::set_permissions(r.join(SCRIPT), std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(provision(&config(HomeMount::None), r).unwrap());
        assert_eq!(
            read(r, "seen"),
            "alice.b 1000 1000 /home/alice.b /usr/bin/zsh m1\n"
        );
        // The script did the work: the built-in setup did not run.
        assert!(read(r, "etc/passwd").contains("ubuntu"));
    }

    #[test]
    fn the_drop_in_is_written_even_without_sudoers_d() {
        let root = ubuntu_root();
        let r = root.path();
        std::fs::remove_dir(r.join("etc/sudoers.d")).unwrap();
        assert!(provision(&config(HomeMount::None), r).unwrap());
        let dir = r.join("etc/sudoers.d");
        assert_eq!(dir.metadata().unwrap().permissions().mode() & 0o777, 0o750);
        assert_eq!(
            read(r, "etc/sudoers.d/alice_b"),
            "alice.b ALL=(ALL) NOPASSWD:ALL\n"
        );
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    }

    #[test]
    fn a_retried_setup_replaces_the_older_drop_in_name() {
        let root = ubuntu_root();
        let r = root.path();
        std::fs::write(r.join("etc/sudoers.d/container-alice_b"), "old\n").unwrap();
        std::fs::write(r.join("etc/sudoers.d/README"), "image\n").unwrap();
        assert!(provision(&config(HomeMount::None), r).unwrap());
        assert!(!r.join("etc/sudoers.d/container-alice_b").exists());
        assert!(r.join("etc/sudoers.d/alice_b").exists());
        assert_eq!(read(r, "etc/sudoers.d/README"), "image\n");
    }

    #[test]
    fn a_cloned_disk_gets_its_own_machine_id_and_the_setup_again() {
        let dir = ubuntu_root();
        let r = dir.path();
        std::fs::write(
            r.join("etc/machine-id"),
            "0123456789abcdef0123456789abcdef\n",
        )
        .unwrap();
        let mut cfg = config(HomeMount::None);
        cfg.instance_id = "aa".repeat(16);
        assert!(provision(&cfg, r).unwrap());
        // The same machine again: nothing to do, its machine-id kept.
        assert!(!provision(&cfg, r).unwrap());
        assert_eq!(
            read(r, "etc/machine-id"),
            "0123456789abcdef0123456789abcdef\n"
        );
        // Its clone boots the same disk content with another identity.
        cfg.instance_id = "bb".repeat(16);
        assert!(provision(&cfg, r).unwrap());
        assert_eq!(read(r, "etc/machine-id"), format!("{}\n", "bb".repeat(16)));
        assert!(!provision(&cfg, r).unwrap());
    }

    #[test]
    fn a_machine_set_up_before_identities_only_records_its_own() {
        let dir = ubuntu_root();
        let r = dir.path();
        assert!(provision(&config(HomeMount::None), r).unwrap());
        std::fs::write(r.join(MARKER), "alice.b\n").unwrap();
        std::fs::write(
            r.join("etc/machine-id"),
            "0123456789abcdef0123456789abcdef\n",
        )
        .unwrap();
        let mut cfg = config(HomeMount::None);
        cfg.instance_id = "cc".repeat(16);
        assert!(!provision(&cfg, r).unwrap());
        assert_eq!(
            read(r, "etc/machine-id"),
            "0123456789abcdef0123456789abcdef\n"
        );
        assert_eq!(read(r, MARKER), format!("alice.b\n{}\n", "cc".repeat(16)));
    }
}
