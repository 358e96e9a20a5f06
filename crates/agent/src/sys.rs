//! The few system calls the agent makes that have no safe wrapper: loading modules from a
//! file, growing ext4 online, making a pty the controlling terminal, and the pre-exec hooks.
//! Every `unsafe` block of the agent is here.

use std::os::fd::AsRawFd;

/// Powers the VM off (QEMU exits); syncs first.
pub fn power_off() {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
}

/// Loads a kernel module from an open file.
pub fn finit_module(file: &std::fs::File) -> std::io::Result<()> {
    let params = c"";
    // SAFETY: finit_module reads the fd and a NUL-terminated parameter string; both outlive
    // the call.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
    if rc == 0 {
        Ok(())
    } else {
        let e = std::io::Error::last_os_error();
        // Already loaded (or built in) is success.
        if e.raw_os_error() == Some(libc::EEXIST) {
            Ok(())
        } else {
            Err(e)
        }
    }
}

nix::ioctl_write_ptr!(ext4_resize_fs, b'f', 16, u64);

/// Grows the ext4 filesystem mounted at `mount` to `blocks` blocks (EXT4_IOC_RESIZE_FS).
pub fn ext4_grow(mount: &std::fs::File, blocks: u64) -> std::io::Result<()> {
    // SAFETY: the ioctl reads one u64 through the pointer, which is valid for the call.
    unsafe { ext4_resize_fs(mount.as_raw_fd(), &blocks) }
        .map(|_| ())
        .map_err(std::io::Error::from)
}

nix::ioctl_read!(blk_getsize64, 0x12, 114, u64);

/// The size in bytes of a block device.
pub fn block_size(dev: &std::fs::File) -> std::io::Result<u64> {
    let mut size = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, valid for the call.
    unsafe { blk_getsize64(dev.as_raw_fd(), &mut size) }.map_err(std::io::Error::from)?;
    Ok(size)
}

/// Makes the calling process a session leader with `tty` as its controlling terminal; for
/// `pre_exec` (async-signal-safe calls only).
pub fn set_controlling_tty(tty: i32) -> std::io::Result<()> {
    // SAFETY: setsid and ioctl(TIOCSCTTY) take no pointers; safe in a forked child.
    unsafe {
        if libc::setsid() < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::ioctl(tty, libc::TIOCSCTTY, 0) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Sets a pty's window size.
pub fn set_winsize(fd: i32, rows: u16, cols: u16) {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize through the pointer, valid for the call.
    unsafe {
        libc::ioctl(fd, libc::TIOCSWINSZ, &ws);
    }
}

/// Adds a `pre_exec` hook to `cmd`.
pub fn pre_exec<F>(cmd: &mut std::process::Command, f: F)
where
    F: FnMut() -> std::io::Result<()> + Send + Sync + 'static,
{
    use std::os::unix::process::CommandExt;
    // SAFETY: the hooks the agent passes only make async-signal-safe system calls
    // (setgroups, setsid, ioctl) and allocate nothing.
    unsafe {
        cmd.pre_exec(f);
    }
}

/// setgroups for a forked child.
pub fn set_groups(groups: &[libc::gid_t]) -> std::io::Result<()> {
    // SAFETY: the pointer and length describe a live slice.
    if unsafe { libc::setgroups(groups.len(), groups.as_ptr()) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Forks; true in the child. Only while the agent is single-threaded.
pub fn fork() -> std::io::Result<bool> {
    // SAFETY: the agent calls this before it starts any thread, so the child may run
    // arbitrary code.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => Ok(true),
        Ok(nix::unistd::ForkResult::Parent { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// kill(2) with a raw signal number (real-time signals have no nix enum value).
pub fn kill_raw(pid: i32, sig: i32) {
    // SAFETY: kill takes two integers.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Starts a new session for a forked child (so signals reach its whole group).
pub fn new_session() -> std::io::Result<()> {
    // SAFETY: setsid takes no arguments.
    if unsafe { libc::setsid() } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// setgid then setuid for a forked child.
pub fn set_ids(uid: u32, gid: u32) -> std::io::Result<()> {
    // SAFETY: plain integer arguments.
    unsafe {
        if libc::setgid(gid) < 0 || libc::setuid(uid) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
