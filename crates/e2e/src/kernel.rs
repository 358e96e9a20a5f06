//! The guest kernel every test service boots, installed once through the CLI into the root
//! the other suites share (`container_testkit::kernel_root`).

use crate::Service;

/// Config lines that point a test service at a kernel installed once and shared by all tests
/// (`container system kernel set --recommended`, run in a cache root).
pub fn kernel_config() -> String {
    static KERNEL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    KERNEL
        .get_or_init(|| {
            let cache = container_testkit::kernel_root();
            let lock = container_testkit::kernel_lock();
            std::fs::create_dir_all(cache.parent().unwrap()).unwrap();
            // One test process installs; the others wait on the lock.
            let lock_file = std::fs::File::create(&lock).unwrap();
            let _guard = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
                .expect("lock the kernel cache");
            let info = cache.join("kernel.json");
            if !info.exists() {
                let service = Service::start_in(&cache);
                let out = service.cli_ok(&["system", "status", "--format", "json"]);
                let status: serde_json::Value = serde_json::from_str(&out).unwrap();
                if status["kernel"].is_null() {
                    service.cli_ok(&["system", "kernel", "set", "--recommended"]);
                }
                let out = service.cli_ok(&["system", "status", "--format", "json"]);
                let status: serde_json::Value = serde_json::from_str(&out).unwrap();
                std::fs::write(&info, status["kernel"].to_string()).unwrap();
            }
            let kernel: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&info).unwrap()).unwrap();
            let mut text = format!("[kernel]\nbinary = {}\n", kernel["path"]);
            if let Some(m) = kernel["modules"].as_str() {
                text.push_str(&format!("modules = \"{m}\"\n"));
            }
            text
        })
        .clone()
}
