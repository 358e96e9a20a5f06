//! First-boot setup of the machine user: the image's `/etc/machine/create-user.sh` when it has
//! one, else the built-in setup (passwd, group and shadow entries with the host's uid and
//! gid, a sudoers drop-in, the home). Accounts of the image that hold the user's name, uid or
//! gid (Ubuntu's `ubuntu` at 1000) give way. Done once: a marker is written only on success.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use container_agent_proto::{BootConfig, HomeMount, UserSpec};

use crate::{Context, Result, log};

const MARKER: &str = "/var/lib/container-agent/provisioned";
const SCRIPT: &str = "/etc/machine/create-user.sh";

pub fn provision(cfg: &BootConfig) -> Result<()> {
    let Some(user) = &cfg.user else { return Ok(()) };
    if Path::new(MARKER).exists() {
        return Ok(());
    }
    let script = Path::new(SCRIPT);
    let scripted = script
        .metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if scripted {
        let status = std::process::Command::new(SCRIPT)
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("CONTAINER_USER", &user.name)
            .env("CONTAINER_UID", user.uid.to_string())
            .env("CONTAINER_GID", user.gid.to_string())
            .env("CONTAINER_HOME", &user.home)
            .env("CONTAINER_SHELL", &user.shell)
            .env("CONTAINER_MACHINE_ID", &cfg.machine_id)
            .status()
            .ctx(format!("running {SCRIPT}"))?;
        if !status.success() {
            return Err(format!("{SCRIPT} failed ({status})"));
        }
        log!("user {} set up by {SCRIPT}", user.name);
    } else {
        builtin(user, cfg.home_mount)?;
        log!("user {} (uid {}) set up", user.name, user.uid);
    }
    std::fs::create_dir_all("/var/lib/container-agent").ctx("creating the marker directory")?;
    std::fs::write(MARKER, format!("{}\n", user.name)).ctx("writing the setup marker")
}

fn read_lines(path: &str) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn write_lines(path: &str, lines: &[String], mode: u32) -> Result<()> {
    let tmp = format!("{path}.container-tmp");
    std::fs::write(&tmp, lines.join("\n") + "\n").ctx(format!("writing {path}"))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .ctx(format!("chmod {path}"))?;
    std::fs::rename(&tmp, path).ctx(format!("replacing {path}"))
}

fn field(line: &str, n: usize) -> &str {
    line.split(':').nth(n).unwrap_or("")
}

/// The built-in setup.
fn builtin(user: &UserSpec, home_mount: HomeMount) -> Result<()> {
    let uid = user.uid.to_string();
    let gid = user.gid.to_string();
    let shell = [user.shell.as_str(), "/bin/bash", "/bin/sh"]
        .into_iter()
        .find(|s| Path::new(s).exists())
        .unwrap_or("/bin/sh")
        .to_string();

    // Accounts holding our name or uid give way, with their shadow entries.
    let passwd = read_lines("/etc/passwd");
    let evicted: Vec<String> = passwd
        .iter()
        .filter(|l| (field(l, 0) == user.name || field(l, 2) == uid) && !l.is_empty())
        .map(|l| field(l, 0).to_string())
        .collect();
    let mut passwd: Vec<String> = passwd
        .into_iter()
        .filter(|l| !evicted.iter().any(|e| field(l, 0) == e))
        .collect();
    passwd.push(format!(
        "{}:x:{uid}:{gid}::{}:{shell}",
        user.name, user.home
    ));
    write_lines("/etc/passwd", &passwd, 0o644)?;

    if Path::new("/etc/shadow").exists() {
        let mut shadow: Vec<String> = read_lines("/etc/shadow")
            .into_iter()
            .filter(|l| !evicted.iter().any(|e| field(l, 0) == e) && field(l, 0) != user.name)
            .collect();
        shadow.push(format!("{}:!:19000:0:99999:7:::", user.name));
        write_lines("/etc/shadow", &shadow, 0o640)?;
    }

    // The group holding our gid becomes ours; a group with our name elsewhere gives way.
    let mut groups: Vec<String> = read_lines("/etc/group")
        .into_iter()
        .filter(|l| !(field(l, 2) == gid || (field(l, 0) == user.name && field(l, 2) != gid)))
        .collect();
    groups.push(format!("{}:x:{gid}:", user.name));
    // Membership in the admin groups the image has; evicted accounts leave member lists.
    let groups: Vec<String> = groups
        .into_iter()
        .map(|l| {
            let mut parts: Vec<String> = l.splitn(4, ':').map(str::to_string).collect();
            if parts.len() < 4 {
                return l;
            }
            let mut members: Vec<String> = parts[3]
                .split(',')
                .filter(|m| !m.is_empty() && !evicted.iter().any(|e| e == m))
                .map(str::to_string)
                .collect();
            if matches!(parts[0].as_str(), "sudo" | "wheel" | "adm")
                && !members.contains(&user.name)
            {
                members.push(user.name.clone());
            }
            parts[3] = members.join(",");
            parts.join(":")
        })
        .collect();
    write_lines("/etc/group", &groups, 0o644)?;
    if Path::new("/etc/gshadow").exists() {
        let mut gshadow: Vec<String> = read_lines("/etc/gshadow")
            .into_iter()
            .filter(|l| field(l, 0) != user.name && !evicted.iter().any(|e| field(l, 0) == e))
            .collect();
        gshadow.push(format!("{}:!::", user.name));
        write_lines("/etc/gshadow", &gshadow, 0o640)?;
    }

    if Path::new("/etc/sudoers.d").is_dir() {
        // sudo ignores drop-ins whose names contain a dot.
        let file = format!("/etc/sudoers.d/container-{}", user.name.replace('.', "_"));
        std::fs::write(&file, format!("{} ALL=(ALL) NOPASSWD:ALL\n", user.name))
            .ctx("writing the sudoers drop-in")?;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o440))
            .ctx("chmod the sudoers drop-in")?;
    }

    if home_mount == HomeMount::None {
        let home = Path::new(&user.home);
        if !home.exists() {
            std::fs::create_dir_all(home).ctx(format!("creating {}", user.home))?;
            copy_skel(Path::new("/etc/skel"), home)?;
            chown_tree(home, user.uid, user.gid)?;
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
        let ft = e.file_type().ctx("reading /etc/skel")?;
        if ft.is_dir() {
            std::fs::create_dir_all(&dest).ctx("copying /etc/skel")?;
            copy_skel(&e.path(), &dest)?;
        } else if ft.is_file() {
            std::fs::copy(e.path(), &dest).ctx("copying /etc/skel")?;
        }
    }
    Ok(())
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .ctx(format!("chown {}", path.display()))?;
    if path.is_dir() && !path.is_symlink() {
        for e in std::fs::read_dir(path).ctx("reading the home")?.flatten() {
            chown_tree(&e.path(), uid, gid)?;
        }
    }
    Ok(())
}
