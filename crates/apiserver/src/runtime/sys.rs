//! The runtime's only unsafe code, where the OS or the CPU demands it: registering a pidfd
//! with tokio's reactor, reading the host's time-stamp counter, between fork and exec
//! setting a child's umask, handing it file descriptors and dropping its privileges, file
//! access with a user's identity on a thread of its own, and paging out another process's
//! memory.

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
    pass_fds(cmd, vec![(fd, target)]);
}

/// [`pass_fd`] for several descriptors at once. Each is first moved above every target, so
/// that placing one never closes another that happens to sit at its number in the service.
pub fn pass_fds(cmd: &mut std::process::Command, fds: Vec<(OwnedFd, std::os::fd::RawFd)>) {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let above = fds.iter().map(|(_, t)| *t).max().unwrap_or(2) + 1;
    let mut moved: Vec<std::os::fd::RawFd> = vec![-1; fds.len()];
    // SAFETY: the hook runs in the forked child before exec and calls only fcntl(2) and
    // dup2(2), which are async-signal-safe; it allocates nothing (`moved` was sized before
    // the fork). The descriptors are owned by the closure, so they are open in the child.
    unsafe {
        cmd.pre_exec(move || {
            for (slot, (fd, _)) in moved.iter_mut().zip(&fds) {
                *slot = libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, above);
                if *slot == -1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // dup2 clears close-on-exec on the copy it makes.
            for (raw, (_, target)) in moved.iter().zip(&fds) {
                if libc::dup2(*raw, *target) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        })
    };
}

/// Makes the child of `cmd` run as `uid`:`gid` with only `groups` besides, without any
/// capability (a change of every uid away from 0 clears them all) and unable to gain any
/// again (`no_new_privs`: no setuid program or file capability works for it). Runs after
/// the working directory is set, so the child may start in a directory it could not reach
/// from `/`.
pub fn drop_privileges(cmd: &mut std::process::Command, uid: u32, gid: u32, groups: Vec<u32>) {
    use std::os::unix::process::CommandExt;
    let groups: Vec<libc::gid_t> = groups;
    // SAFETY: the hook runs in the forked child before exec and calls only setgroups(2),
    // setresgid(2), setresuid(2) and prctl(2), which are async-signal-safe and allocate
    // nothing (`groups` was built before the fork and is only read).
    unsafe {
        cmd.pre_exec(move || {
            let check = |r: libc::c_int| match r {
                -1 => Err(std::io::Error::last_os_error()),
                _ => Ok(()),
            };
            check(libc::setgroups(groups.len(), groups.as_ptr()))?;
            check(libc::setresgid(gid, gid, gid))?;
            check(libc::setresuid(uid, uid, uid))?;
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
        })
    };
}

/// Runs `f` on a thread of its own whose file-system identity is `uid`, `gid` and `groups`
/// (as the kernel checks a path's directories and a socket's mode for that user's own
/// processes), and returns what it returned; the thread ends with `f`, so nothing else ever
/// runs with that identity. Root's identity needs no thread.
///
/// Linux keeps credentials per thread; the raw system calls change only the calling
/// thread's (glibc's `setgroups` would change every thread's). Giving up fsuid 0 also drops
/// the file capabilities (`CAP_DAC_OVERRIDE` and the like) from the thread's effective set.
/// The kernel marks the process not dumpable when a thread's fsuid changes: no core dumps of
/// the service, which only root could read anyway.
pub fn as_user<T: Send + 'static>(
    uid: u32,
    gid: u32,
    groups: &[u32],
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<T> {
    if uid == 0 {
        return Ok(f());
    }
    let groups: Vec<libc::gid_t> = groups.to_vec();
    std::thread::Builder::new()
        .name("as-user".into())
        .spawn(move || -> std::io::Result<T> {
            // SAFETY: setgroups reads `groups.len()` gids from a live slice; setfsgid and
            // setfsuid take integers. All act on this thread alone (raw system calls), and
            // the thread ends when `f` returns.
            unsafe {
                if libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::syscall(libc::SYS_setfsgid, gid);
                libc::syscall(libc::SYS_setfsuid, uid);
                // Both return the previous id, never an error: ask again to be sure they
                // took (an invalid id changes nothing and returns the current one).
                let fsgid = libc::syscall(libc::SYS_setfsgid, u32::MAX) as u32;
                let fsuid = libc::syscall(libc::SYS_setfsuid, u32::MAX) as u32;
                if (fsuid, fsgid) != (uid, gid) {
                    return Err(std::io::Error::other(format!(
                        "could not take the identity {uid}:{gid} (have {fsuid}:{fsgid})"
                    )));
                }
            }
            Ok(f())
        })?
        .join()
        .map_err(|_| std::io::Error::other("the thread acting as a user panicked"))?
}

/// Asks the kernel to page out `ranges` (start, length) of the process behind `pidfd`
/// (process_madvise(2) with `MADV_PAGEOUT`: clean file pages are dropped from its page
/// tables, and from memory when no one else maps them). Needs `CAP_SYS_NICE` and ptrace
/// read access to the process. Neither libc nor rustix wraps it.
pub fn page_out(pidfd: &OwnedFd, ranges: &[(usize, usize)]) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let iov: Vec<libc::iovec> = ranges
        .iter()
        .map(|&(start, len)| libc::iovec {
            iov_base: start as *mut libc::c_void,
            iov_len: len,
        })
        .collect();
    // SAFETY: the kernel reads `iov.len()` iovecs from a live vector; the addresses in them
    // are the other process's and are never dereferenced here.
    let r = unsafe {
        libc::syscall(
            libc::SYS_process_madvise,
            pidfd.as_raw_fd(),
            iov.as_ptr(),
            iov.len(),
            libc::MADV_PAGEOUT,
            0u32,
        )
    };
    match r {
        -1 => Err(std::io::Error::last_os_error()),
        n => Ok(n as usize),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_user_thread_is_refused_what_the_user_may_not_open_and_the_rest_keeps_root() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "root's").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let path = secret.clone();
        let read = super::as_user(65534, 65534, &[], move || std::fs::read(&path)).unwrap();
        assert_eq!(
            read.unwrap_err().kind(),
            std::io::ErrorKind::PermissionDenied
        );
        // Only that thread changed.
        assert_eq!(std::fs::read(&secret).unwrap(), b"root's");
        let path = secret.clone();
        assert!(
            super::as_user(0, 0, &[], move || std::fs::read(&path))
                .unwrap()
                .is_ok()
        );
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_host_tsc_runs_at_a_plausible_frequency() {
        let khz = super::host_tsc_khz(std::time::Duration::from_millis(20)).unwrap();
        assert!((100_000..10_000_000).contains(&khz), "{khz} kHz");
    }
}
