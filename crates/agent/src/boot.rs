//! Bringing a machine up, as PID 1 of the VM: early mounts, the boot config, kernel modules,
//! the machine disk (grown to the device), shares, host name, then the switch into the
//! machine's root, first-boot user setup, and the hand-over to the image's init.

use std::convert::Infallible;
use std::ffi::CString;
use std::path::Path;
use std::time::{Duration, Instant};

use container_agent_proto::{BOOT_CONFIG_PATH, BootConfig, INIT_MARKER};
use nix::mount::{MsFlags, mount};

use crate::{Context, Result, log, server, sys, users};

const NEWROOT: &str = "/newroot";

fn mount_fs(
    src: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<()> {
    std::fs::create_dir_all(target).ctx(format!("creating {target}"))?;
    mount(Some(src), target, Some(fstype), flags, data)
        .ctx(format!("mounting {fstype} on {target}"))
}

/// Runs the boot sequence; returns only on failure.
pub fn run(started: Instant) -> Result<Infallible> {
    mount_fs("proc", "/proc", "proc", MsFlags::empty(), None)?;
    mount_fs("sysfs", "/sys", "sysfs", MsFlags::empty(), None)?;
    mount_fs("devtmpfs", "/dev", "devtmpfs", MsFlags::empty(), None)?;
    let text = std::fs::read(BOOT_CONFIG_PATH).ctx(format!("reading {BOOT_CONFIG_PATH}"))?;
    let cfg: BootConfig = serde_json::from_slice(&text).ctx("parsing the boot config")?;
    log!(
        "machine {} booting (agent {})",
        cfg.hostname,
        env!("CARGO_PKG_VERSION")
    );
    set_clock(cfg.time_unix_ns);

    for m in &cfg.modules {
        let file = std::fs::File::open(m).ctx(format!("opening module {m}"))?;
        sys::finit_module(&file).ctx(format!("loading module {m}"))?;
    }
    log!("{} modules loaded", cfg.modules.len());

    wait_for(&cfg.root_device, Duration::from_secs(20))?;
    mount_fs(&cfg.root_device, NEWROOT, "ext4", MsFlags::empty(), None)?;
    if cfg.grow_root
        && let Err(e) = grow_root(&cfg.root_device)
    {
        // The machine still works at its current size; say why it did not grow.
        log!("warning: {e}");
    }
    for share in &cfg.shares {
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
    nix::unistd::sethostname(&cfg.hostname).ctx("setting the host name")?;
    write_host_files(&cfg)?;
    if let Some(net) = &cfg.network {
        log!(
            "network {} {} via {}",
            net.interface,
            net.address_cidr,
            net.gateway
        );
    }

    switch_root()?;
    if let Err(e) = users::provision(&cfg) {
        // Reported and retried at the next boot; the machine still comes up.
        log!("user setup failed (will retry at next start): {e}");
    }
    let init = if cfg.init.is_empty() {
        vec!["/sbin/init".to_string()]
    } else {
        cfg.init.clone()
    };
    log!("ready in {} ms", started.elapsed().as_millis());
    log!("{}", INIT_MARKER.trim_start_matches("container-agent: "));

    match sys::fork().ctx("forking the agent daemon")? {
        true => {
            let _ = nix::unistd::setsid();
            server::serve(&cfg);
        }
        false => {
            let argv: Vec<CString> = init
                .iter()
                .map(|a| CString::new(a.as_str()).ctx("init argument"))
                .collect::<Result<_>>()?;
            let err = nix::unistd::execv(&argv[0], &argv).unwrap_err();
            Err(format!("starting {}: {err}", init[0]))
        }
    }
}

fn set_clock(unix_ns: u64) {
    if unix_ns == 0 {
        return;
    }
    let ts = nix::sys::time::TimeSpec::new(
        (unix_ns / 1_000_000_000) as i64,
        (unix_ns % 1_000_000_000) as i64,
    );
    let _ = nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts);
}

fn wait_for(path: &str, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    while !Path::new(path).exists() {
        if Instant::now() > deadline {
            return Err(format!(
                "{path} did not appear (is the virtio-blk module in the initramfs?)"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Grows the root ext4 online to fill its device.
fn grow_root(device: &str) -> Result<()> {
    let dev = std::fs::File::open(device).ctx(format!("opening {device}"))?;
    let bytes = sys::block_size(&dev).ctx("reading the disk size")?;
    let st = nix::sys::statvfs::statvfs(NEWROOT).ctx("reading the filesystem size")?;
    let block = st.fragment_size().max(1);
    let want = bytes / block;
    if want > st.blocks() + 1024 {
        let root = std::fs::File::open(NEWROOT).ctx("opening the root")?;
        sys::ext4_grow(&root, want).ctx("growing the root filesystem")?;
        log!("root filesystem grown to {} MiB", bytes >> 20);
    }
    Ok(())
}

fn write_host_files(cfg: &BootConfig) -> Result<()> {
    let etc = format!("{NEWROOT}/etc");
    std::fs::create_dir_all(&etc).ctx("creating /etc")?;
    std::fs::write(format!("{etc}/hostname"), format!("{}\n", cfg.hostname))
        .ctx("writing /etc/hostname")?;
    let hosts_path = format!("{etc}/hosts");
    let hosts = std::fs::read_to_string(&hosts_path).unwrap_or_default();
    let mut lines: Vec<String> = hosts
        .lines()
        .filter(|l| !l.contains("# container"))
        .map(str::to_string)
        .collect();
    if !lines.iter().any(|l| l.starts_with("127.0.0.1")) {
        lines.insert(0, "127.0.0.1\tlocalhost".into());
    }
    lines.push(format!("127.0.1.1\t{} # container", cfg.hostname));
    if let Some(net) = &cfg.network {
        let ip = net.address_cidr.split('/').next().unwrap_or_default();
        lines.push(format!("{ip}\t{} # container", cfg.hostname));
    }
    std::fs::write(&hosts_path, lines.join("\n") + "\n").ctx("writing /etc/hosts")?;
    if let Some(net) = &cfg.network
        && !net.nameservers.is_empty()
    {
        let resolv = format!("{etc}/resolv.conf");
        let _ = std::fs::remove_file(&resolv);
        let text: String = net
            .nameservers
            .iter()
            .map(|n| format!("nameserver {n}\n"))
            .collect();
        std::fs::write(&resolv, text).ctx("writing /etc/resolv.conf")?;
    }
    Ok(())
}

/// Moves the early mounts into the new root and makes it `/`.
fn switch_root() -> Result<()> {
    for m in ["/dev", "/proc", "/sys"] {
        let target = format!("{NEWROOT}{m}");
        std::fs::create_dir_all(&target).ctx(format!("creating {target}"))?;
        mount(
            Some(m),
            target.as_str(),
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .ctx(format!("moving {m}"))?;
    }
    std::env::set_current_dir(NEWROOT).ctx("entering the new root")?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .ctx("moving the new root to /")?;
    nix::unistd::chroot(".").ctx("changing root")?;
    std::env::set_current_dir("/").ctx("entering /")?;
    // Devices the image's init and our sessions expect.
    let _ = mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::empty(),
        Some("gid=5,mode=620,ptmxmode=666"),
    );
    let _ = std::fs::create_dir_all("/run");
    Ok(())
}
