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

use crate::config::{Config, HostNames as HostNamesConfig, NamesConfig};
use crate::core::{Ports, ServiceOptions};
use crate::network::host_names::{self, HostsFile, NoHostNames, RealCommands, Resolved};
use crate::network::{HostNames, Network, RealHost};

/// How the host learns the machines' names: `[network] host-names`, where `auto` is
/// systemd-resolved when it runs and the hosts file otherwise.
fn host_names(config: &NamesConfig) -> Box<dyn HostNames> {
    let resolved = || {
        Box::new(Resolved {
            domain: config.domain.clone(),
            commands: Box::new(RealCommands),
        })
    };
    let hosts = || {
        Box::new(HostsFile {
            path: config.hosts_file.clone(),
            domain: config.domain.clone(),
        })
    };
    match config.host_names {
        HostNamesConfig::Auto if host_names::resolved_running() => resolved(),
        HostNamesConfig::Auto | HostNamesConfig::Hosts => hosts(),
        HostNamesConfig::Resolved => resolved(),
        HostNamesConfig::None => Box::new(NoHostNames),
    }
}

/// The ports of a running service: running machines adopted, the network reconciled.
pub async fn ports(options: &ServiceOptions, config: &Config) -> anyhow::Result<Ports> {
    let images_root = options.root.join("images");
    let store = Arc::new(
        container_image::ImageStore::open(&images_root)
            .with_context(|| format!("opening the image store in {}", images_root.display()))?,
    );
    let host = RealHost::new().context("opening the host network (netlink)")?;
    let network = Arc::new(
        Network::open(&options.root, &config.network, Arc::new(host))?
            .with_names(&config.names.domain, host_names(&config.names))
            .with_resolv_conf(config.names.resolv_conf.clone()),
    );
    let vms = vms(options, config, network.clone())?;
    vms.reconcile_network().await;
    network.start_names().await;
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
