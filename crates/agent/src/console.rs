//! The boot log: lines the agent writes on the console, which the host keeps as the
//! machine's `console.log`. Every line is stamped with the time since the kernel started, so
//! it lines up with the kernel's own stamps. Before the host can reach the daemon, and for
//! whatever fails outside a session, the console is the only place the agent reports to.

/// Seconds since the kernel started (CLOCK_BOOTTIME), for log stamps.
pub fn boot_time() -> f64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9)
        .unwrap_or(0.0)
}

/// Prints a boot-log line on the console, stamped with [`boot_time`].
macro_rules! log {
    ($($arg:tt)*) => {{
        eprintln!(
            "container-agent: {} [{:.3}s]",
            format!($($arg)*),
            $crate::console::boot_time()
        );
    }};
}
pub(crate) use log;
