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

/// Writes `boot.log` from the console, unless this boot's is already written.
pub fn write_boot_log(machine_dir: &Path) {
    let boot_log = machine_dir.join(BOOT);
    if boot_log.exists() {
        return;
    }
    let Ok(console) = std::fs::read(console_path(machine_dir)) else {
        return;
    };
    if let Err(e) = crate::fsutil::atomic_write(&boot_log, boot_part(&console), 0o644) {
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

/// The last `n` lines of a log, for errors that point at it.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    String::from_utf8_lossy(crate::logs::last_lines(&text, Some(n))).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

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
