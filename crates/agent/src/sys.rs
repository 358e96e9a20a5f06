//! The system calls the agent makes on the machine as a whole, and those that have no safe
//! wrapper: loading modules from a file, growing ext4 online, reading a disk's size, the
//! clock, the pre-exec hooks of sessions, fork, raw signals and power-off. Every `unsafe`
//! block of the agent is here.

use std::os::fd::AsRawFd;

/// Sets the machine's clock to `unix_ns` nanoseconds since the epoch.
pub fn set_clock(unix_ns: u64) -> nix::Result<()> {
    let ts = nix::sys::time::TimeSpec::new(
        (unix_ns / 1_000_000_000) as i64,
        (unix_ns % 1_000_000_000) as i64,
    );
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts)
}

/// Powers the VM off (QEMU exits); syncs first.
pub fn power_off() {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
}

/// Loads a kernel module from an open file; one already loaded (or built in) is success.
pub fn finit_module(file: &std::fs::File) -> std::io::Result<()> {
    let params = c"";
    // SAFETY: finit_module reads the fd and a NUL-terminated parameter string; both outlive
    // the call.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
    if rc == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EEXIST) {
        Ok(())
    } else {
        Err(e)
    }
}

nix::ioctl_readwrite!(fifreeze, b'X', 119, libc::c_int);
nix::ioctl_readwrite!(fithaw, b'X', 120, libc::c_int);

/// Freezes the filesystem mounted at `mount` (writes block until [`thaw`]); the kernel
/// syncs it first, so its on-disk state is consistent while frozen.
pub fn freeze(mount: &std::fs::File) -> std::io::Result<()> {
    let mut unused: libc::c_int = 0;
    // SAFETY: FIFREEZE ignores its argument; the pointer is to a live int for the call.
    unsafe { fifreeze(mount.as_raw_fd(), &mut unused) }
        .map(|_| ())
        .map_err(std::io::Error::from)
}

/// Thaws what [`freeze`] froze.
pub fn thaw(mount: &std::fs::File) -> std::io::Result<()> {
    let mut unused: libc::c_int = 0;
    // SAFETY: FITHAW ignores its argument; the pointer is to a live int for the call.
    unsafe { fithaw(mount.as_raw_fd(), &mut unused) }
        .map(|_| ())
        .map_err(std::io::Error::from)
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
pub fn block_device_size(dev: &std::fs::File) -> std::io::Result<u64> {
    let mut size = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, valid for the call.
    unsafe { blk_getsize64(dev.as_raw_fd(), &mut size) }.map_err(std::io::Error::from)?;
    Ok(size)
}

/// What a session's child does between fork and exec.
#[derive(Debug, Clone)]
pub struct ChildSetup {
    /// Make stdin (a pty) the controlling terminal of the new session.
    pub controlling_tty: bool,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<libc::gid_t>,
}

/// Arranges for `setup` to run in the child of `cmd`: a new session (so signals reach the
/// whole process group), the controlling terminal, then the groups and ids.
pub fn child_setup(cmd: &mut std::process::Command, setup: ChildSetup) {
    use std::os::unix::process::CommandExt;
    let hook = move || -> std::io::Result<()> {
        // SAFETY: setsid, ioctl(TIOCSCTTY) on fd 0, setgroups (pointer and length of a live
        // slice), setgid and setuid are async-signal-safe and take no other pointers; the
        // hook allocates nothing.
        unsafe {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if setup.controlling_tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setgroups(setup.groups.len(), setup.groups.as_ptr()) < 0
                || libc::setgid(setup.gid) < 0
                || libc::setuid(setup.uid) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    };
    // SAFETY: the hook only makes the async-signal-safe calls above.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// Forks; true in the child. Only while the agent is single-threaded.
pub fn fork() -> std::io::Result<bool> {
    // SAFETY: the agent calls this during boot, before it starts any thread, so the child
    // may run arbitrary code.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => Ok(true),
        Ok(nix::unistd::ForkResult::Parent { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// kill(2) with a raw signal number (real-time signals have no nix enum value).
pub fn kill_raw(pid: i32, sig: i32) -> std::io::Result<()> {
    // SAFETY: kill takes two integers.
    if unsafe { libc::kill(pid, sig) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Puts every signal back to its default disposition and unblocks all: the image's init
/// must not inherit the Rust runtime's ignored SIGPIPE.
pub fn reset_signals() {
    for sig in 1..=libc::SIGRTMAX() {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: installing SIG_DFL involves no handler code.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
        }
    }
    let _ = nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&nix::sys::signal::SigSet::empty()),
        None,
    );
}
