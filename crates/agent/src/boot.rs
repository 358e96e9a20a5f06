//! Bringing a machine up, as PID 1 of the VM: early mounts, the boot config, kernel modules,
//! the machine disk (grown to the device), shares, host name, network, the switch into the
//! machine's root, first-boot user setup, and the hand-over: PID 1 execs the image's init,
//! a forked child becomes the vsock daemon. Every step is logged to the console; the first
//! failure is returned and ends the boot.

use std::convert::Infallible;
use std::ffi::CString;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use container_agent_proto::{BOOT_CONFIG_PATH, BootConfig, INIT_MARKER};
use nix::mount::{MsFlags, mount};

use crate::console::{self, log};
use crate::{net, server, sys, users};

const NEWROOT: &str = "/newroot";

/// How long the machine disk may take to appear once its driver loaded.
const DISK_WAIT: Duration = Duration::from_secs(20);

fn mount_fs(
    src: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<()> {
    std::fs::create_dir_all(target).with_context(|| format!("creating {target}"))?;
    mount(Some(src), target, Some(fstype), flags, data)
        .with_context(|| format!("mounting {fstype} {src} on {target}"))
}

/// Runs the boot sequence; returns only on failure.
pub fn run() -> Result<Infallible> {
    let nosuid_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs("proc", "/proc", "proc", nosuid_noexec, None)?;
    mount_fs("sysfs", "/sys", "sysfs", nosuid_noexec, None)?;
    mount_fs(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )?;
    mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("gid=5,mode=620,ptmxmode=666"),
    )?;
    mount_fs(
        "shm",
        "/dev/shm",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    mount_fs(
        "tmpfs",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;

    let text =
        std::fs::read(BOOT_CONFIG_PATH).with_context(|| format!("reading {BOOT_CONFIG_PATH}"))?;
    let cfg: BootConfig = serde_json::from_slice(&text).context("parsing the boot config")?;
    log!(
        "machine {} ({}) booting, agent {}",
        cfg.hostname,
        cfg.machine_id,
        env!("CARGO_PKG_VERSION")
    );
    if cfg.time_unix_ns != 0
        && let Err(e) = sys::set_clock(cfg.time_unix_ns)
    {
        log!("warning: cannot set the clock: {e}");
    }

    for m in &cfg.modules {
        let file = std::fs::File::open(m).with_context(|| format!("opening module {m}"))?;
        sys::finit_module(&file).with_context(|| format!("loading module {m}"))?;
    }
    log!("{} kernel modules loaded", cfg.modules.len());

    wait_for(&cfg.root_device)?;
    mount_fs(&cfg.root_device, NEWROOT, "ext4", MsFlags::empty(), None)?;
    log!("machine disk {} mounted", cfg.root_device);
    if cfg.grow_root {
        match grow_root(&cfg.root_device) {
            Ok(Some(mib)) => log!("root filesystem grown to {mib} MiB"),
            Ok(None) => {}
            // The machine still works at its current size; say why it did not grow.
            Err(e) => log!("warning: root filesystem not grown: {e:#}"),
        }
    }
    for share in &cfg.shares {
        if !share.guest_path.starts_with('/') {
            bail!(
                "share {} has a relative guest path {:?}",
                share.tag,
                share.guest_path
            );
        }
        let target = format!("{NEWROOT}{}", share.guest_path);
        let flags = if share.read_only {
            MsFlags::MS_RDONLY
        } else {
            MsFlags::empty()
        };
        mount_fs(&share.tag, &target, "virtiofs", flags, None)?;
        log!(
            "shared {} at {}{}",
            share.tag,
            share.guest_path,
            if share.read_only { " (read-only)" } else { "" }
        );
    }
    nix::unistd::sethostname(&cfg.hostname).context("setting the host name")?;
    write_host_files(Path::new(NEWROOT), &cfg)?;
    net::configure(cfg.network.as_ref()).context("configuring the network")?;
    if let Some(n) = &cfg.network {
        log!(
            "network {} {} via {}",
            n.interface,
            n.address_cidr,
            n.gateway
        );
    }

    switch_root()?;
    log!("switched to the machine's root");
    match users::provision(&cfg, Path::new("/")) {
        Ok(true) => log!("user set up"),
        Ok(false) => {}
        // Reported and retried at the next boot; the machine still comes up.
        Err(e) => log!("user setup failed, will retry at the next start: {e:#}"),
    }
    let init = if cfg.init.is_empty() {
        vec!["/sbin/init".to_string()]
    } else {
        cfg.init.clone()
    };
    let argv: Vec<CString> = init
        .iter()
        .map(|a| CString::new(a.as_str()).with_context(|| format!("init argument {a:?}")))
        .collect::<Result<_>>()?;
    if !Path::new(&init[0]).exists() {
        bail!(
            "the image has no {} (a machine image needs an init)",
            init[0]
        );
    }

    // The daemon starts before init so that `Pong.init_running` can be observed turning true.
    if sys::fork().context("forking the agent daemon")? {
        let _ = nix::unistd::setsid();
        server::serve(&cfg);
    }
    eprintln!(
        "{INIT_MARKER} {} [{:.3}s]",
        init.join(" "),
        console::boot_time()
    );
    sys::reset_signals();
    let err = nix::unistd::execve(&argv[0], &argv, &init_env()).unwrap_err();
    Err(anyhow!(err).context(format!("starting {}", init[0])))
}

/// The environment init starts with: the kernel's (`HOME`, `TERM`) plus a `PATH`, which the
/// kernel does not give and inits that run scripts before setting their own need (openrc-init
/// stopped early finds no `openrc` without it).
fn init_env() -> Vec<CString> {
    let mut env: Vec<String> = std::env::vars().map(|(k, v)| format!("{k}={v}")).collect();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    }
    env.into_iter()
        .filter_map(|e| CString::new(e).ok())
        .collect()
}

fn wait_for(path: &str) -> Result<()> {
    let deadline = Instant::now() + DISK_WAIT;
    while !Path::new(path).exists() {
        if Instant::now() > deadline {
            bail!("{path} did not appear (is the virtio_blk module in the initramfs?)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Reads the block count in an ext4 superblock (at byte 1024 of the device).
fn ext4_block_count(device: &mut std::fs::File) -> Result<(u64, u64)> {
    use std::io::{Read, Seek, SeekFrom};
    let mut sb = [0u8; 1024];
    device.seek(SeekFrom::Start(1024))?;
    device.read_exact(&mut sb)?;
    if u16::from_le_bytes([sb[0x38], sb[0x39]]) != 0xEF53 {
        bail!("no ext4 superblock");
    }
    let lo = u32::from_le_bytes(sb[4..8].try_into()?) as u64;
    let hi = u32::from_le_bytes(sb[0x150..0x154].try_into()?) as u64;
    let log = u32::from_le_bytes(sb[24..28].try_into()?);
    let block_size = 1024u64 << log.min(6);
    // The high word counts only with the 64-bit feature.
    let incompat_64bit = u32::from_le_bytes(sb[0x60..0x64].try_into()?) & 0x80 != 0;
    Ok((lo | if incompat_64bit { hi << 32 } else { 0 }, block_size))
}

/// Grows the root ext4 online to fill its device; the new size in MiB when it grew.
fn grow_root(device: &str) -> Result<Option<u64>> {
    let mut dev = std::fs::File::open(device).with_context(|| format!("opening {device}"))?;
    let bytes = sys::block_device_size(&dev).context("reading the disk size")?;
    let (blocks, block_size) = ext4_block_count(&mut dev).context("reading the superblock")?;
    let want = bytes / block_size;
    if want <= blocks {
        return Ok(None);
    }
    let root = std::fs::File::open(NEWROOT).context("opening the root")?;
    sys::ext4_grow(&root, want).context("EXT4_IOC_RESIZE_FS")?;
    Ok(Some(bytes >> 20))
}

/// Writes /etc/hostname, the machine's lines of /etc/hosts and /etc/resolv.conf.
pub fn write_host_files(root: &Path, cfg: &BootConfig) -> Result<()> {
    let etc = root.join("etc");
    std::fs::create_dir_all(&etc).context("creating /etc")?;
    std::fs::write(etc.join("hostname"), format!("{}\n", cfg.hostname))
        .context("writing /etc/hostname")?;
    let hosts_path = etc.join("hosts");
    let hosts = std::fs::read_to_string(&hosts_path).unwrap_or_default();
    let address = cfg
        .network
        .as_ref()
        .and_then(|n| n.address_cidr.split('/').next().map(str::to_string));
    std::fs::write(
        &hosts_path,
        hosts_file(&hosts, &cfg.hostname, address.as_deref()),
    )
    .context("writing /etc/hosts")?;
    if let Some(net) = &cfg.network
        && !net.nameservers.is_empty()
    {
        write_resolv_conf(&etc, &net.nameservers)?;
    }
    Ok(())
}

/// Replaces /etc/resolv.conf at each boot with the service's nameservers (the gateway), so a
/// machine whose file an older service wrote (the host's resolvers) is moved over too.
fn write_resolv_conf(etc: &Path, nameservers: &[String]) -> Result<()> {
    let resolv = etc.join("resolv.conf");
    // Often a symlink into /run (systemd-resolved); ours replaces it, its target untouched.
    let _ = std::fs::remove_file(&resolv);
    let text: String = nameservers
        .iter()
        .map(|n| format!("nameserver {n}\n"))
        .collect();
    std::fs::write(&resolv, text).context("writing /etc/resolv.conf")
}

/// The hosts file: our two lines first, `127.0.0.1 localhost` then the machine's address
/// and name (`127.0.1.1` without a network), as Apple's machines have them and scripts read
/// them; then the image's own lines. Ours are marked, so the next boot replaces them, and
/// separated by one space, as readers that split on spaces expect.
fn hosts_file(existing: &str, hostname: &str, address: Option<&str>) -> String {
    const MARK: &str = "# container";
    let mut out = format!(
        "127.0.0.1 localhost {MARK}\n{} {hostname} {MARK}\n",
        address.unwrap_or("127.0.1.1")
    );
    for l in existing.lines().filter(|l| !l.ends_with(MARK)) {
        out.push_str(l);
        out.push('\n');
    }
    out
}

/// Moves the early mounts into the new root, frees the initramfs, and makes the new root `/`.
fn switch_root() -> Result<()> {
    for m in ["/dev", "/proc", "/sys", "/run"] {
        let target = format!("{NEWROOT}{m}");
        std::fs::create_dir_all(&target).with_context(|| format!("creating {target}"))?;
        mount(
            Some(m),
            target.as_str(),
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .with_context(|| format!("moving {m} into the machine's root"))?;
    }
    free_initramfs();
    std::env::set_current_dir(NEWROOT).context("entering the new root")?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .context("moving the new root to /")?;
    nix::unistd::chroot(".").context("changing root")?;
    std::env::set_current_dir("/").context("entering /")?;
    Ok(())
}

/// Deletes the initramfs's files (the agent binary, modules, the boot config): they would
/// hold guest memory for the machine's whole life. Only on a RAM filesystem, never crossing
/// into a mount.
fn free_initramfs() {
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    let Ok(st) = nix::sys::statfs::statfs("/") else {
        return;
    };
    let kind = st.filesystem_type().0;
    if kind != RAMFS_MAGIC && kind != TMPFS_MAGIC {
        return;
    }
    let Ok(root) = std::fs::symlink_metadata("/") else {
        return;
    };
    remove_tree(Path::new("/"), root.dev());
}

fn remove_tree(dir: &Path, dev: u64) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.dev() != dev {
            continue;
        }
        if meta.is_dir() {
            remove_tree(&path, dev);
            let _ = std::fs::remove_dir(&path);
        } else {
            let _ = std::fs::remove_file(&path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_keep_the_image_lines_and_replace_ours() {
        let image = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n";
        let once = hosts_file(image, "dev", Some("192.168.64.2"));
        assert_eq!(
            once,
            "127.0.0.1 localhost # container\n192.168.64.2 dev # container\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n"
        );
        let renamed = hosts_file(&once, "other", None);
        assert_eq!(
            renamed,
            "127.0.0.1 localhost # container\n127.0.1.1 other # container\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n"
        );
        // A file written by an older agent (our line last) is rewritten the same way.
        let older = "127.0.0.1\tlocalhost\n127.0.1.1\tdev # container\n";
        assert_eq!(
            hosts_file(older, "dev", None),
            "127.0.0.1 localhost # container\n127.0.1.1 dev # container\n127.0.0.1\tlocalhost\n"
        );
        assert_eq!(
            hosts_file("", "dev", None),
            "127.0.0.1 localhost # container\n127.0.1.1 dev # container\n"
        );
    }

    #[test]
    fn an_old_resolv_conf_or_a_symlink_is_replaced_by_the_gateway() {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc");
        std::fs::create_dir_all(&etc).unwrap();
        let gateway = ["192.168.64.1".to_string()];
        // What an older service wrote: the host's resolvers.
        std::fs::write(
            etc.join("resolv.conf"),
            "nameserver 10.255.255.53\nnameserver 192.0.2.7\n",
        )
        .unwrap();
        write_resolv_conf(&etc, &gateway).unwrap();
        assert_eq!(
            std::fs::read_to_string(etc.join("resolv.conf")).unwrap(),
            "nameserver 192.168.64.1\n"
        );
        // systemd-resolved's link into /run: replaced by a file, its target left alone.
        let stub = dir.path().join("stub-resolv.conf");
        std::fs::write(&stub, "nameserver 127.0.0.53\n").unwrap();
        std::fs::remove_file(etc.join("resolv.conf")).unwrap();
        std::os::unix::fs::symlink(&stub, etc.join("resolv.conf")).unwrap();
        write_resolv_conf(&etc, &gateway).unwrap();
        let meta = std::fs::symlink_metadata(etc.join("resolv.conf")).unwrap();
        assert!(meta.is_file());
        assert_eq!(
            std::fs::read_to_string(etc.join("resolv.conf")).unwrap(),
            "nameserver 192.168.64.1\n"
        );
        assert_eq!(
            std::fs::read_to_string(&stub).unwrap(),
            "nameserver 127.0.0.53\n"
        );
    }

    #[test]
    fn the_superblock_gives_the_block_count() {
        if !container_testkit::have("mkfs.ext4") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("fs.ext4");
        let ok = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", "4096"])
            .arg(&img)
            .arg("32M")
            .status();
        assert!(ok.is_ok_and(|s| s.success()), "mkfs.ext4 failed");
        let mut f = std::fs::File::open(&img).unwrap();
        assert_eq!(ext4_block_count(&mut f).unwrap(), (8192, 4096));
    }
}
