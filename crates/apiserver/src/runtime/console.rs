//! A machine's serial console. QEMU writes the whole stream (kernel, agent, then the image's
//! init) to `<machine dir>/console.log`, rewritten at each boot. The boot log is the part up
//! to and including the agent's [`INIT_MARKER`] line: once the agent answers (or the VM
//! exits), that prefix is copied to `boot.log`; before then, the whole console is the boot
//! log so far. `logs` shows `console.log`, `logs --boot` the boot log.

use std::path::{Path, PathBuf};

use container_agent_proto::INIT_MARKER;

const CONSOLE: &str = "console.log";
const BOOT: &str = "boot.log";

pub fn console_path(machine_dir: &Path) -> PathBuf {
    machine_dir.join(CONSOLE)
}

/// The log to show: the boot log when `boot`, else the whole console.
pub fn log_path(machine_dir: &Path, boot: bool) -> PathBuf {
    let boot_log = machine_dir.join(BOOT);
    if boot && boot_log.exists() {
        boot_log
    } else {
        console_path(machine_dir)
    }
}

/// Forgets the previous boot's logs.
pub fn reset(machine_dir: &Path) {
    let _ = std::fs::remove_file(machine_dir.join(BOOT));
    let _ = std::fs::remove_file(console_path(machine_dir));
}

/// The console up to the end of the init marker's line; all of it when there is none.
pub fn boot_part(console: &[u8]) -> &[u8] {
    let marker = INIT_MARKER.as_bytes();
    match console.windows(marker.len()).position(|w| w == marker) {
        Some(i) => {
            let end = console[i..]
                .iter()
                .position(|b| *b == b'\n')
                .map_or(console.len(), |n| i + n + 1);
            &console[..end]
        }
        None => console,
    }
}

/// The most of the console's start searched for the boot log: the kernel and the agent print
/// a few KiB before init starts; a guest may print without end after.
const BOOT_LOG_MAX: u64 = 1 << 20;

/// Writes `boot.log` from the console, unless this boot's is already written.
pub fn write_boot_log(machine_dir: &Path) {
    use std::io::Read;
    let boot_log = machine_dir.join(BOOT);
    if boot_log.exists() {
        return;
    }
    let Ok(file) = std::fs::File::open(console_path(machine_dir)) else {
        return;
    };
    let mut console = Vec::new();
    if file.take(BOOT_LOG_MAX).read_to_end(&mut console).is_err() {
        return;
    }
    if let Err(e) = crate::fsutil::atomic_write(&boot_log, boot_part(&console), 0o600) {
        tracing::warn!(log = %boot_log.display(), "cannot write the boot log: {e}");
    }
}

/// What the guest kernel prints last when it reboots (`kernel_restart`), which QEMU's
/// `-no-reboot` turns into its exit. A panic does not print it: a machine whose init died
/// stays stopped.
const REBOOT_LINE: &str = "reboot: Restarting system";

/// Whether the console ends with the guest kernel rebooting.
pub fn rebooted(machine_dir: &Path) -> bool {
    tail(&console_path(machine_dir), 3).contains(REBOOT_LINE)
}

/// The kernel's last words when the guest powers itself off.
const POWER_DOWN_LINE: &str = "reboot: Power down";

/// Whether the console ends with the guest kernel rebooting or powering off: the guest
/// ended itself, rather than crashing or being killed.
pub fn ended_itself(machine_dir: &Path) -> bool {
    let end = tail(&console_path(machine_dir), 3);
    end.contains(REBOOT_LINE) || end.contains(POWER_DOWN_LINE)
}

/// The last `n` lines of a log, for errors that point at it.
pub fn tail(path: &Path, n: usize) -> String {
    String::from_utf8_lossy(&crate::logs::read_tail(path, n).unwrap_or_default()).into_owned()
}

/// How large the console may grow before its start is dropped.
pub const CONSOLE_CAP: u64 = 8 << 20;
/// How much of its end a capped console keeps.
const CONSOLE_KEEP: u64 = 2 << 20;

/// Keeps the console under [`CONSOLE_CAP`] by dropping its start, so a guest that floods its
/// serial port fills neither the disk nor the memory of whoever reads the log. The VMM
/// appends to the file (`append=on`), so the start can go while it writes: with
/// `FALLOC_FL_COLLAPSE_RANGE` (ext4, XFS) the kernel removes whole blocks of the start in
/// place; elsewhere the kept end is copied over the start and the file cut after it, which
/// may lose what the guest wrote during the copy. Returns whether it trimmed.
pub fn trim(path: &Path) -> bool {
    use nix::fcntl::{FallocateFlags, fallocate};
    use std::io::{Read, Seek, Write};
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    if meta.len() <= CONSOLE_CAP {
        return false;
    }
    let Ok(mut file) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    else {
        return false;
    };
    let block = meta.blksize().max(512);
    let drop = (meta.len() - CONSOLE_KEEP) / block * block;
    let collapsed = fallocate(
        std::os::fd::AsRawFd::as_raw_fd(&file),
        FallocateFlags::FALLOC_FL_COLLAPSE_RANGE,
        0,
        drop as i64,
    );
    if collapsed.is_ok() {
        return true;
    }
    let mut kept = Vec::with_capacity(CONSOLE_KEEP as usize);
    let copied = file
        .seek(std::io::SeekFrom::Start(meta.len() - CONSOLE_KEEP))
        .and_then(|_| (&mut file).take(CONSOLE_KEEP).read_to_end(&mut kept))
        .and_then(|_| file.seek(std::io::SeekFrom::Start(0)))
        .and_then(|_| file.write_all(&kept))
        .and_then(|_| file.set_len(kept.len() as u64));
    copied.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flooded_console_keeps_its_end_under_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = console_path(dir.path());
        let mut text = Vec::new();
        let mut i = 0;
        while text.len() < 3 * CONSOLE_CAP as usize {
            text.extend_from_slice(format!("flood {i}\n").as_bytes());
            i += 1;
        }
        std::fs::write(&path, &text).unwrap();
        assert!(trim(&path));
        let len = std::fs::metadata(&path).unwrap().len();
        assert!((CONSOLE_KEEP..=CONSOLE_CAP).contains(&len), "{len}");
        assert!(tail(&path, 1).contains(&format!("flood {}", i - 1)));
        assert!(!trim(&path), "under the cap: left alone");
    }

    #[test]
    fn the_boot_log_ends_at_the_init_marker() {
        let console = format!("kernel\ncontainer-agent: ready\n{INIT_MARKER}\ninit says hi\n");
        let boot = String::from_utf8(boot_part(console.as_bytes()).to_vec()).unwrap();
        assert_eq!(
            boot,
            format!("kernel\ncontainer-agent: ready\n{INIT_MARKER}\n")
        );
        assert_eq!(boot_part(b"kernel panic\n"), b"kernel panic\n");

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(console_path(dir.path()), &console).unwrap();
        assert_eq!(
            log_path(dir.path(), true),
            console_path(dir.path()),
            "boot in progress"
        );
        write_boot_log(dir.path());
        assert_eq!(
            std::fs::read_to_string(log_path(dir.path(), true)).unwrap(),
            boot
        );
        assert_eq!(log_path(dir.path(), false), console_path(dir.path()));
        reset(dir.path());
        assert!(!dir.path().join(BOOT).exists());
    }

    #[test]
    fn a_reboot_is_told_from_a_power_off_and_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let ends = |text: &str| {
            std::fs::write(console_path(dir.path()), text).unwrap();
            rebooted(dir.path())
        };
        assert!(ends(
            "init: rebooting\n[   12.3] reboot: Restarting system\n"
        ));
        assert!(!ends("[   12.3] reboot: Power down\n"));
        assert!(!ends(
            "[    9.1] Kernel panic - not syncing: Attempted to kill init!\n[    9.2] Rebooting in -1 seconds..\n"
        ));
        // Only the end counts: an earlier reboot of the same console is not this exit's.
        assert!(!ends(
            "reboot: Restarting system\n1\n2\n3\n4\nreboot: Power down\n"
        ));
        std::fs::remove_file(console_path(dir.path())).unwrap();
        assert!(!rebooted(dir.path()));
    }
}
