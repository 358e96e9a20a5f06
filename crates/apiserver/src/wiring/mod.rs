//! Binds each of the core's ports (`core::ports`) to the real thing, one file per port:
//! `images` (the OCI image store), `vms` (the VM runtime), `net` (the machine network's
//! leases, and its taps for the runtime), `platform` (kernel and accelerator), `host` (passwd
//! and paths). Nothing outside this module and `main.rs` builds a real port, and this is the
//! only module that sees both the core and the subsystems behind it.

mod host;
mod images;
mod net;
mod platform;
mod vms;

use std::sync::Arc;

use anyhow::Context;

pub use host::LocalHost;
pub use images::StoreImages;
pub use platform::HostPlatform;
pub use vms::{ServiceVms, vms};

use crate::config::Config;
use crate::core::{Ports, ServiceOptions};
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
    let vms = vms(options, config, network.clone())?;
    vms.reconcile_network().await;
    Ok(Ports {
        images: Arc::new(StoreImages::new(store, config.registry.clone())),
        vms,
        net: Arc::new(net::Leases(network)),
        platform: Arc::new(HostPlatform {
            root: options.root.clone(),
            virtualization: config.runtime.virtualization,
            first_install: Default::default(),
        }),
        host: Arc::new(LocalHost),
    })
}
