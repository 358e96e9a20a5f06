//! Connects the core's ports to the real image store and VM runtime.

use std::sync::Arc;

use anyhow::Context;

use crate::config::Config;
use crate::core::{Ports, ServiceOptions, StoreImages};

/// The ports of a running service.
pub fn ports(options: &ServiceOptions, config: &Config) -> anyhow::Result<Ports> {
    let images_root = options.root.join("images");
    let store = Arc::new(
        container_image::ImageStore::open(&images_root)
            .with_context(|| format!("opening the image store in {}", images_root.display()))?,
    );
    Ok(Ports {
        images: Arc::new(StoreImages(store.clone())),
        store,
        vms: crate::runtime::vms(options, config)?,
    })
}
