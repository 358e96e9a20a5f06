//! System requests: status and properties.

use container_api::system::SystemStatus;

use super::Core;

impl Core {
    pub(super) fn status(&self) -> SystemStatus {
        let o = &self.state.options;
        SystemStatus {
            status: "running".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            api_version: "v1".into(),
            pid: std::process::id(),
            root: o.root.display().to_string(),
            socket: o.socket.display().to_string(),
            started: self.state.started,
            virtualization: "tcg".into(),
            kernel: None,
            images: 0,
            machines: 0,
            machines_running: 0,
        }
    }
}
