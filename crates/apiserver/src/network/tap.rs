//! The one place the network module talks to the kernel without a safe wrapper: creating a
//! persistent tap through the TUNSETIFF and TUNSETPERSIST ioctls on /dev/net/tun (netlink
//! cannot create tun devices: the kernel refuses `ip link add type tun`), and opening one
//! for a VMM that may not (it runs unprivileged and gets the open descriptor).
use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;

/// Creates the tap `name` (at most 15 bytes), persistent so it outlives this call; owned by
/// root, the only user allowed to attach to it ([`open_tap`]).
pub fn create_persistent_tap(name: &str) -> io::Result<()> {
    let tun = open_tap(name)?;
    // SAFETY: TUNSETPERSIST takes its argument by value (1 = persist); the fd is attached to
    // the tap `open_tap` made.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Attaches to the tap `name` (creating it if it does not exist, gone when closed unless
/// made persistent): the descriptor a VMM reads and writes the VM's frames on, with virtio
/// net headers.
pub fn open_tap(name: &str) -> io::Result<std::fs::File> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("`{name}` is not a valid interface name"),
        ));
    }
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;

    // SAFETY: ifreq is plain old data (arrays, integers, a union of those and a pointer);
    // all zero bytes is a valid value and the kernel's own default.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;

    // SAFETY: TUNSETIFF reads a `struct ifreq` through the pointer, which points to a live,
    // initialised ifreq for the duration of the call; the fd is an open /dev/net/tun.
    if unsafe {
        libc::ioctl(
            tun.as_raw_fd(),
            libc::TUNSETIFF,
            &mut req as *mut libc::ifreq,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(tun)
}
