//! The runtime's only unsafe code, where the OS or the CPU demands it: registering a pidfd
//! with tokio's reactor, reading the host's time-stamp counter, and setting a child's umask
//! and handing it a file descriptor between fork and exec.

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

/// A pidfd registered with the reactor (readable once the process exits).
pub fn register_pidfd(fd: OwnedFd) -> std::io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: the fd is an `OwnedFd` moved into the `AsyncFd`, which keeps it open and
    // referring to the same process until the `AsyncFd` is dropped.
    unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

/// The host's TSC frequency in kHz, measured against the monotonic clock over `window`.
/// Under TCG a guest's TSC is the host's, so handing its frequency to the guest kernel
/// spares it a calibration against an emulated PIT, which fails on a busy host and leaves
/// the guest without a working timer.
#[cfg(target_arch = "x86_64")]
pub fn host_tsc_khz(window: Duration) -> Option<u64> {
    // SAFETY: RDTSC exists on every x86_64 CPU and has no memory effects.
    let tsc = || unsafe { core::arch::x86_64::_rdtsc() };
    let (t0, c0) = (Instant::now(), tsc());
    std::thread::sleep(window);
    let (t1, c1) = (Instant::now(), tsc());
    let nanos = t1.duration_since(t0).as_nanos() as u64;
    (nanos > 0 && c1 > c0).then(|| (c1 - c0) * 1_000_000 / nanos)
}

#[cfg(not(target_arch = "x86_64"))]
pub fn host_tsc_khz(_window: Duration) -> Option<u64> {
    None
}

/// Makes the child of `cmd` create its files for its owner alone (umask 077), whatever the
/// service's own umask: the helpers' sockets (QMP, vhost-user, hybrid vsock) give whoever
/// can connect control of the VM or a root shell in it.
pub fn private_umask(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the hook runs in the forked child before exec and only calls umask(2), which
    // is async-signal-safe, allocates nothing and touches no memory of the parent's.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
            Ok(())
        })
    };
}

/// Makes `fd` the child's descriptor number `target`, open across exec (every other
/// descriptor of the service stays close-on-exec). The parent's copy is closed when `cmd` is
/// dropped.
pub fn pass_fd(cmd: &mut std::process::Command, fd: OwnedFd, target: std::os::fd::RawFd) {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    // SAFETY: the hook runs in the forked child before exec and calls only dup2(2) and
    // fcntl(2), which are async-signal-safe and allocate nothing; `fd` is owned by the
    // closure, so it is open in the child when the hook runs.
    unsafe {
        cmd.pre_exec(move || {
            let raw = fd.as_raw_fd();
            if raw == target {
                // dup2 onto itself keeps close-on-exec: clear it instead.
                if libc::fcntl(raw, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(raw, target) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_host_tsc_runs_at_a_plausible_frequency() {
        let khz = super::host_tsc_khz(std::time::Duration::from_millis(20)).unwrap();
        assert!((100_000..10_000_000).contains(&khz), "{khz} kHz");
    }
}
