//! Connects the core's ports to the real image store, VM runtime and machine network.

use std::sync::Arc;

use anyhow::Context;

use crate::config::Config;
use crate::core::{Ports, ServiceOptions, StoreImages};
use crate::network::{Network, RealHost};

/// The ports of a running service: running machines adopted, the network reconciled.
pub async fn ports(options: &ServiceOptions, config: &Config) -> anyhow::Result<Ports> {
    let images_root = options.root.join("images");
    let store = Arc::new(
        container_image::ImageStore::open(&images_root)
            .with_context(|| format!("opening the image store in {}", images_root.display()))?,
    );
    let host = RealHost::new().context("opening the host network (netlink)")?;
    let network = Arc::new(Network::open(
        &options.root,
        &config.network,
        Arc::new(host),
    )?);
    let vms = crate::runtime::vms(options, config, network.clone())?;
    vms.reconcile_network().await;
    Ok(Ports {
        images: Arc::new(StoreImages(store.clone())),
        store,
        vms,
        net: network,
    })
}
