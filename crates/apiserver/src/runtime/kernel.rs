//! The kernel machines boot: installed into `<root>/kernels/<version>/` (the image and its
//! module tree) from a given binary, or from the distribution's cloud kernel package fetched
//! with `apt-get download` and unpacked with `dpkg-deb -x` (nothing is installed on the host).
//! `<root>/kernels/current.json` names the one in use.

use std::path::{Path, PathBuf};
use std::process::Command;

use container_api::ApiError;
use container_api::system::KernelInfo;
use sha2::Digest;

use crate::fsutil;

fn kernels(root: &Path) -> PathBuf {
    root.join("kernels")
}

/// The kernel in use, if one is installed.
pub fn current(root: &Path) -> Option<KernelInfo> {
    fsutil::read_json(&kernels(root).join("current.json"))
        .ok()
        .flatten()
}

fn sha256_file(path: &Path) -> Result<String, ApiError> {
    let bytes = std::fs::read(path)
        .map_err(|e| ApiError::invalid(format!("reading kernel {}: {e}", path.display())))?;
    Ok(format!(
        "sha256:{}",
        hex::encode(sha2::Sha256::digest(&bytes))
    ))
}

fn run(cmd: &mut Command, what: &str) -> Result<String, ApiError> {
    let out = cmd.output().map_err(|e| {
        ApiError::internal(format!("{what}: cannot run {:?}: {e}", cmd.get_program()))
    })?;
    if !out.status.success() {
        return Err(ApiError::new(
            container_api::ErrorKind::Unavailable,
            format!(
                "{what} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn copy_tree(from: &Path, to: &Path) -> Result<(), ApiError> {
    run(
        Command::new("cp").arg("-a").arg(from).arg(to),
        "copying the kernel modules",
    )
    .map(|_| ())
}

/// Installs a kernel binary with an optional module tree; it becomes the current kernel.
pub fn install(
    root: &Path,
    binary: &Path,
    modules: Option<&Path>,
    version: Option<String>,
) -> Result<KernelInfo, ApiError> {
    if !binary.is_file() {
        return Err(ApiError::invalid(format!(
            "kernel {} is not a file",
            binary.display()
        )));
    }
    if let Some(m) = modules
        && !m.is_dir()
    {
        return Err(ApiError::invalid(format!(
            "module directory {} does not exist",
            m.display()
        )));
    }
    let digest = sha256_file(binary)?;
    let version = version
        .or_else(|| {
            modules
                .and_then(|m| m.file_name())
                .map(|n| n.to_string_lossy().to_string())
        })
        .unwrap_or_else(|| digest.trim_start_matches("sha256:")[..12].to_string());
    let dir = kernels(root).join(&version);
    let tmp = kernels(root).join(format!(".{version}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)
        .map_err(|e| ApiError::internal(format!("creating {}: {e}", tmp.display())))?;
    std::fs::copy(binary, tmp.join("vmlinuz"))
        .map_err(|e| ApiError::internal(format!("copying the kernel: {e}")))?;
    if let Some(m) = modules {
        copy_tree(m, &tmp.join("modules"))?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir)
        .map_err(|e| ApiError::internal(format!("installing the kernel: {e}")))?;
    let info = KernelInfo {
        name: version.clone(),
        version,
        path: dir.join("vmlinuz").display().to_string(),
        digest,
        modules: modules.map(|_| dir.join("modules").display().to_string()),
    };
    fsutil::write_json(&kernels(root).join("current.json"), &info)
        .map_err(|e| ApiError::internal(format!("recording the kernel: {e}")))?;
    Ok(info)
}

/// Fetches and installs the distribution's cloud kernel (Debian and Ubuntu hosts).
pub fn install_recommended(root: &Path) -> Result<KernelInfo, ApiError> {
    let meta = ["linux-image-cloud-amd64", "linux-image-virtual"]
        .into_iter()
        .find(|p| {
            Command::new("apt-cache")
                .args(["show", p])
                .output()
                .is_ok_and(|o| o.status.success() && !o.stdout.is_empty())
        })
        .ok_or_else(|| {
            ApiError::new(
                container_api::ErrorKind::Unavailable,
                "no cloud kernel package found with apt-cache (this needs a Debian or Ubuntu host with package lists: run `apt-get update`), or give one with `container system kernel set --binary PATH --modules DIR`",
            )
        })?;
    let depends = run(
        Command::new("apt-cache").args(["depends", meta]),
        "resolving the kernel package",
    )?;
    let package = depends
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .ok_or_else(|| ApiError::internal(format!("{meta} depends on no linux-image package")))?
        .to_string();
    let work = tempfile::tempdir_in(root).map_err(|e| ApiError::internal(e.to_string()))?;
    // apt's sandbox user must be able to write the download directory.
    let _ = std::fs::set_permissions(
        work.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    );
    run(
        Command::new("apt-get")
            .args(["download", "-q", &package])
            .current_dir(work.path()),
        &format!("downloading {package}"),
    )?;
    let deb = std::fs::read_dir(work.path())
        .map_err(|e| ApiError::internal(e.to_string()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or_else(|| {
            ApiError::internal(format!("apt-get download left no .deb for {package}"))
        })?;
    let x = work.path().join("x");
    run(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&x),
        "unpacking the kernel package",
    )?;
    let boot = x.join("boot");
    let vmlinuz = std::fs::read_dir(&boot)
        .map_err(|e| ApiError::internal(format!("{}: {e}", boot.display())))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .ok_or_else(|| ApiError::internal("the kernel package has no /boot/vmlinuz-*"))?;
    let version = vmlinuz
        .file_name()
        .expect("found by name")
        .to_string_lossy()
        .trim_start_matches("vmlinuz-")
        .to_string();
    let modules = x.join("lib/modules").join(&version);
    install(root, &vmlinuz, Some(&modules), Some(version))
}
