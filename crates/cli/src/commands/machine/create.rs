//! `container machine create`: a machine from an image, pulled first when the store does not
//! have it, with progress on a terminal (the pull, then the boot, which on a new host
//! installs the recommended kernel first).

use clap::Args;
use container_api::client::ClientError;
use container_api::machine::{CreateRequest, HomeMount, Machine, MountSpec, Platform};
use container_api::size::parse_size;
use container_api::{Client, ErrorKind, ExitCode};

use crate::exit::failed;

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The image, e.g. `127.0.0.1:5000/debian:12`.
    image: String,
    /// Machine name (default: derived from the image, `alpine:latest` → `alpine-latest`).
    #[arg(short, long)]
    name: Option<String>,
    /// Make it the default machine.
    #[arg(long)]
    set_default: bool,
    /// Create without booting.
    #[arg(long, conflicts_with = "wait")]
    no_boot: bool,
    /// Return once the image's init has finished booting (systemd `running` or `degraded`,
    /// OpenRC's default runlevel), not as soon as commands can run.
    #[arg(long)]
    wait: bool,
    #[arg(long)]
    cpus: Option<u32>,
    /// Memory, e.g. 2G (default: half the host's).
    #[arg(long, value_parser = parse_size)]
    memory: Option<u64>,
    /// Virtual disk size, e.g. 64G.
    #[arg(long, value_parser = parse_size)]
    disk_size: Option<u64>,
    /// How your home directory is shared: rw, ro or none.
    #[arg(long)]
    home_mount: Option<HomeMount>,
    /// Share another host directory: HOST:GUEST[:ro]. Repeatable.
    #[arg(long = "mount", value_name = "HOST:GUEST[:ro]", value_parser = parse_mount)]
    mounts: Vec<MountSpec>,
    /// `none` for a machine with only loopback networking. Otherwise the machine has an
    /// address on the machine network and the name NAME.machine, and resolves names through
    /// the service (its owner's machines as NAME.machine, other names through the host's
    /// resolvers).
    #[arg(long)]
    network: Option<String>,
    /// A kernel image to boot instead of the system's.
    #[arg(long)]
    kernel: Option<String>,
    /// Boot the machine whenever the service starts (after a host reboot), and again if its
    /// VM dies unexpectedly (with back-off; never one stopped on purpose).
    #[arg(long)]
    autostart: bool,
    /// Forward host port HOST (on 127.0.0.1) to GUEST in the machine whenever it runs, even
    /// before anything listens there (listening ports are forwarded anyway, at their own
    /// number). TCP unless followed by /udp (`5300:53/udp`). Repeatable.
    #[arg(short, long, value_name = "HOST:GUEST[/udp]")]
    publish: Vec<container_api::ports::Publish>,
    /// The image platform, OS/ARCH: machines run the host's, `linux/amd64` here; another is
    /// refused before anything is pulled.
    #[arg(long, value_name = "OS/ARCH")]
    platform: Option<String>,
    /// The image OS (only `linux`).
    #[arg(long, value_name = "OS")]
    os: Option<String>,
    /// The image architecture (only the host's).
    #[arg(short, long, value_name = "ARCH")]
    arch: Option<String>,
    /// Print nothing but the machine's name and errors (no progress).
    #[arg(short, long)]
    quiet: bool,
}

/// Checks `--platform`, `--os` and `--arch` (as Apple's `machine create` takes them) against
/// the only platform a machine can run: the host's, as the service pulls images for it.
fn check_platform(a: &CreateArgs) -> Result<(), String> {
    let host = Platform::host();
    let mut wanted: Vec<(&str, &str)> = Vec::new();
    if let Some(p) = &a.platform {
        let mut parts = p.split('/');
        match (parts.next(), parts.next()) {
            (Some(os), Some(arch)) if !os.is_empty() && !arch.is_empty() => {
                wanted.push(("os", os));
                wanted.push(("arch", arch));
            }
            _ => {
                return Err(format!(
                    "invalid platform `{p}`: expected OS/ARCH, e.g. linux/{}",
                    host.architecture
                ));
            }
        }
    }
    if let Some(os) = &a.os {
        wanted.push(("os", os));
    }
    if let Some(arch) = &a.arch {
        wanted.push(("arch", arch));
    }
    for (what, value) in wanted {
        let ok = match what {
            "os" => value == host.os,
            _ => normalise_arch(value) == host.architecture,
        };
        if !ok {
            return Err(format!(
                "platform {what} `{value}` is not supported: machines run {}/{}, this host's platform",
                host.os, host.architecture
            ));
        }
    }
    Ok(())
}

/// OCI's name for an architecture also spelled the kernel's way.
fn normalise_arch(arch: &str) -> &str {
    match arch {
        "x86_64" | "x86-64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn parse_mount(text: &str) -> Result<MountSpec, String> {
    let parts: Vec<&str> = text.split(':').collect();
    let (host, guest, read_only) = match parts.as_slice() {
        [h, g] => (*h, *g, false),
        [h, g, "ro"] => (*h, *g, true),
        [h, g, "rw"] => (*h, *g, false),
        _ => return Err(format!("invalid mount `{text}`: expected HOST:GUEST[:ro]")),
    };
    if !guest.starts_with('/') {
        return Err(format!(
            "invalid mount `{text}`: the guest path must be absolute"
        ));
    }
    let host = std::path::absolute(host)
        .map_err(|e| format!("invalid mount `{text}`: {e}"))?
        .display()
        .to_string();
    Ok(MountSpec {
        host_path: host,
        guest_path: guest.to_string(),
        read_only,
    })
}

/// Pulls the image when the store does not have it, with progress.
async fn ensure_image(client: &Client, image: &str, quiet: bool) -> anyhow::Result<()> {
    let path = format!(
        "/images/inspect?{}",
        serde_urlencoded::to_string([("reference", image)]).expect("encodes")
    );
    match client.get::<serde_json::Value>(&path).await {
        Ok(_) => Ok(()),
        Err(ClientError::Api(e)) if e.kind == ErrorKind::NotFound => {
            crate::commands::image::pull(client, image, quiet)
                .await
                .map(|_| ())
        }
        Err(e) => Err(e.into()),
    }
}

pub async fn run(client: &Client, a: CreateArgs) -> anyhow::Result<()> {
    check_platform(&a).map_err(|e| failed(ExitCode::Usage, e))?;
    ensure_image(client, &a.image, a.quiet).await?;
    let spinner = boot_progress(client, &a).await;
    let request = CreateRequest {
        image: a.image,
        name: a.name,
        set_default: a.set_default,
        no_boot: a.no_boot,
        cpus: a.cpus,
        memory: a.memory,
        disk_size: a.disk_size,
        home_mount: a.home_mount,
        mounts: a.mounts,
        network: a.network,
        kernel: a
            .kernel
            .map(|k| std::path::absolute(k).map(|p| p.display().to_string()))
            .transpose()?,
        autostart: a.autostart,
        publish: a.publish,
    };
    let machine = client.post::<_, Machine>("/machines", &request).await;
    crate::progress::done(spinner);
    let machine = machine?;
    if a.wait {
        let spinner =
            crate::progress::spinner(format!("waiting for {} to boot", machine.id), a.quiet);
        let booted = super::wait_until_booted(client, &machine.id).await;
        crate::progress::done(spinner);
        booted?;
    }
    println!("{}", machine.id);
    Ok(())
}

/// A spinner for the boot on a terminal (none when quiet, piped or not booting), saying
/// when the first boot installs the guest kernel, which takes a while.
async fn boot_progress(client: &Client, a: &CreateArgs) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if a.quiet || a.no_boot || !std::io::stderr().is_terminal() {
        return None;
    }
    let kernel_missing = a.kernel.is_none()
        && client
            .get::<container_api::system::SystemStatus>("/system/status")
            .await
            .is_ok_and(|s| s.kernel.is_none())
        && client
            .get::<Vec<container_api::system::Property>>("/system/properties")
            .await
            .is_ok_and(|p| !p.iter().any(|p| p.key == "kernel.binary"));
    let what = a.name.as_deref().unwrap_or("the machine");
    crate::progress::spinner(
        if kernel_missing {
            format!("installing the recommended guest kernel (first use), then booting {what}")
        } else {
            format!("booting {what}")
        },
        false,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn platform(args: &[&str]) -> Result<(), String> {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            a: CreateArgs,
        }
        let mut argv = vec!["create", "img"];
        argv.extend_from_slice(args);
        check_platform(&Cli::try_parse_from(argv).unwrap().a)
    }

    #[test]
    fn only_the_hosts_platform_is_accepted() {
        let host = Platform::host();
        let native = format!("linux/{}", host.architecture);
        assert_eq!(platform(&[]), Ok(()));
        assert_eq!(platform(&["--platform", &native]), Ok(()));
        assert_eq!(platform(&["--os", "linux"]), Ok(()));
        assert_eq!(platform(&["-a", &host.architecture]), Ok(()));
        if host.architecture == "amd64" {
            assert_eq!(platform(&["--arch", "x86_64"]), Ok(()));
        }
        let other = if host.architecture == "amd64" {
            "linux/arm64"
        } else {
            "linux/amd64"
        };
        let e = platform(&["--platform", other]).unwrap_err();
        assert!(e.contains("not supported") && e.contains(&native), "{e}");
        assert!(
            platform(&["--os", "windows"])
                .unwrap_err()
                .contains("windows")
        );
        assert!(
            platform(&["--platform", "linux"])
                .unwrap_err()
                .contains("OS/ARCH")
        );
    }

    #[test]
    fn mounts_parse_with_optional_ro() {
        let m = parse_mount("/srv/data:/data:ro").unwrap();
        assert_eq!(
            (m.host_path.as_str(), m.guest_path.as_str(), m.read_only),
            ("/srv/data", "/data", true)
        );
        assert!(!parse_mount("/a:/b").unwrap().read_only);
        assert!(parse_mount("/a").unwrap_err().contains("HOST:GUEST"));
        assert!(parse_mount("/a:rel").unwrap_err().contains("absolute"));
        assert!(parse_mount("/a:/b:rx").is_err());
    }
}
