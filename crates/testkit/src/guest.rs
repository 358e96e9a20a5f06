//! What a test VM boots, made the way the product makes it: the guest agent built static as
//! `scripts/build.sh` builds it, and the distribution's cloud kernel fetched and installed by
//! the service's own code (`runtime::kernel`) into a root in the test cache. That root is the
//! one the end-to-end tests install their kernel into with `container system kernel set
//! --recommended`, under the same lock, so every suite downloads it once.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub use container_apiserver::runtime::Kernel;
use container_apiserver::runtime::kernel;

/// The distribution's cloud kernel, installed once into [`crate::kernel_root`].
pub fn kernel() -> Kernel {
    static KERNEL: OnceLock<Kernel> = OnceLock::new();
    KERNEL
        .get_or_init(|| {
            let root = crate::kernel_root();
            std::fs::create_dir_all(&root).unwrap();
            let lock = std::fs::File::create(crate::kernel_lock()).unwrap();
            let _guard = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
                .expect("lock the kernel cache");
            let info = match kernel::current(&root) {
                Some(info) if Path::new(&info.path).exists() => info,
                _ => kernel::fetch_recommended(&root).expect("install the kernel"),
            };
            Kernel::from_info(&info)
        })
        .clone()
}

/// The static agent, built as scripts/build.sh builds it (once per test process).
pub fn agent() -> &'static Path {
    static AGENT: OnceLock<PathBuf> = OnceLock::new();
    AGENT.get_or_init(|| {
        let status = Command::new(env!("CARGO"))
            .args([
                "build",
                "--release",
                "-q",
                "-p",
                "container-agent",
                "--target",
                "x86_64-unknown-linux-gnu",
            ])
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .current_dir(crate::workspace())
            .status()
            .expect("running cargo");
        assert!(
            status.success(),
            "building the static agent failed (see scripts/build.sh)"
        );
        crate::workspace().join("target/x86_64-unknown-linux-gnu/release/container-agent")
    })
}
