//! The kernel machines boot. Each installed kernel is a directory `<root>/kernels/<name>/`
//! holding `vmlinuz`, its module tree `modules/` (when it has one) and `kernel.json` (name,
//! version, sha256 digest); `<root>/kernels/current.json` is the one in use. A kernel comes
//! from a given binary (copied), or from the distribution's cloud kernel package fetched with
//! `apt-get download` into a temporary directory and unpacked with `dpkg-deb -x`: nothing is
//! installed on the host. A directory appears under its final name only when complete.
//! Where the package comes from is a [`PackageSource`]: the host's apt ([`Apt`]), or, in
//! tests, a directory of `.deb` files.

use std::path::{Path, PathBuf};
use std::process::Command;

use container_api::system::KernelInfo;
use sha2::Digest;

use super::RuntimeError;
use crate::fsutil;

/// Metapackages that depend on the distribution's current cloud or virtual kernel, in order
/// of preference (Debian, then Ubuntu).
const KERNEL_PACKAGES: &[&str] = &["linux-image-cloud-amd64", "linux-image-virtual"];

/// A kernel ready to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    pub vmlinuz: PathBuf,
    /// The module tree (`lib/modules/<version>`), when the kernel has modules.
    pub modules: Option<PathBuf>,
    /// Identifies the kernel and its modules for the initramfs cache.
    pub digest: String,
}

impl Kernel {
    /// The kernel an installed [`KernelInfo`] describes.
    pub fn from_info(info: &KernelInfo) -> Self {
        Kernel {
            vmlinuz: PathBuf::from(&info.path),
            modules: info.modules.as_ref().map(PathBuf::from),
            digest: info.digest.clone(),
        }
    }

    /// A kernel outside the data directory (named in config): identified by path, size and
    /// modification time, which changes whenever the file is replaced, without hashing 10+
    /// MB at every boot.
    pub fn at(vmlinuz: &Path, modules: Option<&Path>) -> Result<Self, RuntimeError> {
        let meta =
            std::fs::metadata(vmlinuz).map_err(RuntimeError::io("reading the kernel", vmlinuz))?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        Ok(Kernel {
            vmlinuz: vmlinuz.to_path_buf(),
            modules: modules.map(Path::to_path_buf),
            digest: format!("file:{}:{}:{mtime}", vmlinuz.display(), meta.len()),
        })
    }
}

fn kernels(root: &Path) -> PathBuf {
    root.join("kernels")
}

/// The kernel in use, if one is installed.
pub fn current(root: &Path) -> Option<KernelInfo> {
    fsutil::read_json(&kernels(root).join("current.json"))
        .ok()
        .flatten()
}

/// Installs a kernel binary with an optional module tree; it becomes the current kernel.
pub fn install(
    root: &Path,
    binary: &Path,
    modules: Option<&Path>,
    version: Option<String>,
) -> Result<KernelInfo, RuntimeError> {
    if !binary.is_file() {
        return Err(RuntimeError::KernelNotAFile(binary.to_path_buf()));
    }
    if let Some(m) = modules
        && !m.is_dir()
    {
        return Err(RuntimeError::ModulesNotADirectory(m.to_path_buf()));
    }
    let bytes = std::fs::read(binary).map_err(RuntimeError::io("reading the kernel", binary))?;
    let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&bytes)));
    let version = version
        .or_else(|| {
            modules
                .and_then(|m| m.file_name())
                .map(|n| n.to_string_lossy().to_string())
        })
        .unwrap_or_else(|| digest["sha256:".len()..][..12].to_string());
    let name = version.replace('/', "_");
    let dir = kernels(root).join(&name);
    let tmp = kernels(root).join(format!(".{name}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(RuntimeError::io("creating", &tmp))?;
    std::fs::write(tmp.join("vmlinuz"), &bytes)
        .map_err(RuntimeError::io("writing", tmp.join("vmlinuz")))?;
    if let Some(m) = modules {
        copy_tree(m, &tmp.join("modules"))?;
    }
    let info = KernelInfo {
        name: name.clone(),
        version,
        path: dir.join("vmlinuz").display().to_string(),
        digest,
        modules: modules.map(|_| dir.join("modules").display().to_string()),
    };
    fsutil::write_json(&tmp.join("kernel.json"), &info)
        .map_err(RuntimeError::io("writing", tmp.join("kernel.json")))?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir).map_err(RuntimeError::io("installing the kernel into", &dir))?;
    fsutil::write_json(&kernels(root).join("current.json"), &info).map_err(RuntimeError::io(
        "writing",
        kernels(root).join("current.json"),
    ))?;
    Ok(info)
}

/// Copies a directory tree, keeping symbolic links as links (module trees carry `build`
/// and `source` links into a host's /usr/src, which may dangle).
fn copy_tree(from: &Path, to: &Path) -> Result<(), RuntimeError> {
    std::fs::create_dir_all(to).map_err(RuntimeError::io("creating", to))?;
    for entry in std::fs::read_dir(from).map_err(RuntimeError::io("reading", from))? {
        let entry = entry.map_err(RuntimeError::io("reading", from))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let kind = entry
            .file_type()
            .map_err(RuntimeError::io("reading", &src))?;
        if kind.is_symlink() {
            let target = std::fs::read_link(&src).map_err(RuntimeError::io("reading", &src))?;
            std::os::unix::fs::symlink(target, &dst).map_err(RuntimeError::io("creating", &dst))?;
        } else if kind.is_dir() {
            copy_tree(&src, &dst)?;
        } else {
            std::fs::copy(&src, &dst).map_err(RuntimeError::io("copying into", &dst))?;
        }
    }
    Ok(())
}

/// Runs a command; its stdout, or its stderr as the error.
fn run(cmd: &mut Command, what: &str) -> Result<String, RuntimeError> {
    let program = cmd.get_program().to_string_lossy().to_string();
    let out = cmd.output().map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound && program.starts_with("apt") {
            RuntimeError::NoApt
        } else {
            RuntimeError::Spawn {
                program: program.clone(),
                source,
            }
        }
    })?;
    if !out.status.success() {
        return Err(RuntimeError::CommandFailed {
            what: what.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The versioned kernel package a metapackage depends on, from `apt-cache depends` output.
fn versioned_package(depends: &str) -> Option<String> {
    depends
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .map(|p| p.trim_start_matches('|').trim())
        .find(|p| p.starts_with("linux-image-") && p.chars().any(|c| c.is_ascii_digit()))
        .map(str::to_string)
}

/// Where the recommended kernel's packages come from.
pub trait PackageSource {
    /// The versioned kernel image package to install (`linux-image-6.1.0-…-cloud-amd64`).
    fn kernel_package(&self) -> Result<String, RuntimeError>;
    /// Puts the `.deb` of `package` into `dir`.
    fn download(&self, package: &str, dir: &Path) -> Result<(), RuntimeError>;
}

/// The host's apt: its package lists say which kernel is current, `apt-get download` fetches
/// it from the host's configured archive.
#[derive(Debug, Clone, Copy)]
pub struct Apt;

impl PackageSource for Apt {
    fn kernel_package(&self) -> Result<String, RuntimeError> {
        let mut known = None;
        for p in KERNEL_PACKAGES {
            let out = run(
                Command::new("apt-cache").args(["show", "-q", p]),
                "apt-cache show",
            );
            match out {
                Ok(text) if !text.trim().is_empty() => {
                    known = Some(*p);
                    break;
                }
                Err(RuntimeError::NoApt) => return Err(RuntimeError::NoApt),
                _ => {}
            }
        }
        let meta = known.ok_or_else(|| RuntimeError::NoKernelPackage {
            tried: KERNEL_PACKAGES.join(", "),
        })?;
        let depends = run(
            Command::new("apt-cache").args(["depends", meta]),
            &format!("resolving {meta}"),
        )?;
        versioned_package(&depends).ok_or_else(|| RuntimeError::NoVersionedKernel {
            package: meta.to_string(),
        })
    }

    fn download(&self, package: &str, dir: &Path) -> Result<(), RuntimeError> {
        run(
            Command::new("apt-get")
                .args(["download", "-q", package])
                .current_dir(dir),
            &format!("downloading {package} with apt-get"),
        )
        .map(|_| ())
    }
}

/// Downloads one package into `dir` and unpacks it into `dir/x`.
fn download_and_unpack(
    source: &dyn PackageSource,
    dir: &Path,
    package: &str,
) -> Result<(), RuntimeError> {
    let before: Vec<PathBuf> = debs(dir)?;
    source.download(package, dir)?;
    let deb = debs(dir)?
        .into_iter()
        .find(|p| !before.contains(p))
        .ok_or_else(|| RuntimeError::BadKernelPackage {
            package: package.to_string(),
            what: ".deb file after apt-get download".into(),
        })?;
    run(
        Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(dir.join("x")),
        &format!("unpacking {package}"),
    )
    .map(|_| ())
}

fn debs(dir: &Path) -> Result<Vec<PathBuf>, RuntimeError> {
    Ok(std::fs::read_dir(dir)
        .map_err(RuntimeError::io("reading", dir))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect())
}

/// Installs the distribution's recommended cloud kernel through the host's apt; it becomes
/// the current kernel.
pub fn fetch_recommended(root: &Path) -> Result<KernelInfo, RuntimeError> {
    install_recommended(root, &Apt)
}

/// Installs the kernel `source` recommends, with its modules; it becomes the current kernel.
pub fn install_recommended(
    root: &Path,
    source: &dyn PackageSource,
) -> Result<KernelInfo, RuntimeError> {
    let package = source.kernel_package()?;
    std::fs::create_dir_all(kernels(root)).map_err(RuntimeError::io("creating", kernels(root)))?;
    let work = tempfile::Builder::new()
        .prefix(".download-")
        .tempdir_in(kernels(root))
        .map_err(RuntimeError::io("creating a directory in", kernels(root)))?;
    // apt drops privileges to its sandbox user for downloads, which must write here.
    let _ = std::fs::set_permissions(
        work.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    );
    download_and_unpack(source, work.path(), &package)?;
    let x = work.path().join("x");
    let vmlinuz = std::fs::read_dir(x.join("boot"))
        .map_err(RuntimeError::io(
            "reading the unpacked package at",
            x.join("boot"),
        ))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .ok_or_else(|| RuntimeError::BadKernelPackage {
            package: package.clone(),
            what: "/boot/vmlinuz-*".into(),
        })?;
    let version = vmlinuz
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .trim_start_matches("vmlinuz-")
                .to_string()
        })
        .unwrap_or_default();
    let mut modules = x.join("lib/modules").join(&version);
    if !modules.is_dir() {
        // Ubuntu ships the modules in a package of their own.
        download_and_unpack(source, work.path(), &format!("linux-modules-{version}"))?;
        if !modules.is_dir() {
            modules = x.join("usr/lib/modules").join(&version);
        }
    }
    let modules = modules.is_dir().then_some(modules);
    install(root, &vmlinuz, modules.as_deref(), Some(version))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_versioned_image_from_apt_cache_depends() {
        let out = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n";
        assert_eq!(
            versioned_package(out).as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64")
        );
        let ubuntu = "linux-image-virtual\n  Depends: linux-image-6.8.0-45-generic\n  Depends: linux-firmware\n";
        assert_eq!(
            versioned_package(ubuntu).as_deref(),
            Some("linux-image-6.8.0-45-generic")
        );
        assert_eq!(versioned_package("x\n  Depends: libc6\n"), None);
    }

    /// Packages built here with `dpkg-deb`, as the archive would serve them.
    struct LocalDebs {
        dir: PathBuf,
        kernel: String,
    }

    impl PackageSource for LocalDebs {
        fn kernel_package(&self) -> Result<String, RuntimeError> {
            Ok(self.kernel.clone())
        }
        fn download(&self, package: &str, dir: &Path) -> Result<(), RuntimeError> {
            let deb = self.dir.join(format!("{package}.deb"));
            std::fs::copy(&deb, dir.join(format!("{package}_1_amd64.deb")))
                .map(|_| ())
                .map_err(RuntimeError::io("copying", &deb))
        }
    }

    /// Builds `NAME.deb` in `dir` holding `files` (path, content).
    fn deb(dir: &Path, name: &str, files: &[(&str, &[u8])]) {
        let tree = dir.join(format!("{name}.tree"));
        std::fs::create_dir_all(tree.join("DEBIAN")).unwrap();
        std::fs::write(
            tree.join("DEBIAN/control"),
            format!(
                "Package: {name}\nVersion: 1\nArchitecture: amd64\nMaintainer: t <t@t>\n\
                 Description: test\n"
            ),
        )
        .unwrap();
        for (path, body) in files {
            let p = tree.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, body).unwrap();
        }
        let out = Command::new("dpkg-deb")
            .args(["--root-owner-group", "-b"])
            .arg(&tree)
            .arg(dir.join(format!("{name}.deb")))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn the_recommended_kernel_installs_from_its_package_source() {
        if Command::new("dpkg-deb").arg("--version").output().is_err() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let debs = dir.path().join("debs");
        std::fs::create_dir_all(&debs).unwrap();
        let package = "linux-image-6.1.0-9-cloud-amd64";
        deb(
            &debs,
            package,
            &[
                ("boot/vmlinuz-6.1.0-9-cloud-amd64", b"kernel image"),
                ("boot/config-6.1.0-9-cloud-amd64", b"CONFIG_EXT4_FS=y"),
                (
                    "lib/modules/6.1.0-9-cloud-amd64/kernel/fs/fuse/virtiofs.ko",
                    b"module",
                ),
            ],
        );
        let root = dir.path().join("root");
        let source = LocalDebs {
            dir: debs,
            kernel: package.into(),
        };
        let info = install_recommended(&root, &source).unwrap();
        assert_eq!(info.version, "6.1.0-9-cloud-amd64");
        assert_eq!(std::fs::read(&info.path).unwrap(), b"kernel image");
        let modules = PathBuf::from(info.modules.clone().unwrap());
        assert!(modules.join("kernel/fs/fuse/virtiofs.ko").is_file());
        assert_eq!(current(&root), Some(info));
        // The download area is gone: only the installed kernel and the pointer remain.
        let mut left: Vec<String> = std::fs::read_dir(root.join("kernels"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["6.1.0-9-cloud-amd64", "current.json"]);
    }

    #[test]
    fn installs_a_binary_with_its_modules_and_makes_it_current() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("6.1.0-test/kernel/drivers")).unwrap();
        std::fs::write(src.join("vmlinuz"), b"kernel image").unwrap();
        std::fs::write(src.join("6.1.0-test/kernel/drivers/a.ko"), b"module").unwrap();
        std::os::unix::fs::symlink("/usr/src/absent", src.join("6.1.0-test/build")).unwrap();
        let root = dir.path().join("root");
        assert!(current(&root).is_none());
        let info = install(
            &root,
            &src.join("vmlinuz"),
            Some(&src.join("6.1.0-test")),
            None,
        )
        .unwrap();
        assert_eq!(info.version, "6.1.0-test");
        assert!(info.digest.starts_with("sha256:"));
        assert_eq!(std::fs::read(&info.path).unwrap(), b"kernel image");
        let modules = PathBuf::from(info.modules.clone().unwrap());
        assert_eq!(
            std::fs::read(modules.join("kernel/drivers/a.ko")).unwrap(),
            b"module"
        );
        assert!(modules.join("build").is_symlink());
        assert_eq!(current(&root), Some(info.clone()));
        let recorded: KernelInfo = fsutil::read_json(&root.join("kernels/6.1.0-test/kernel.json"))
            .unwrap()
            .unwrap();
        assert_eq!(recorded, info);

        let err = install(&root, &src.join("absent"), None, None).unwrap_err();
        assert!(matches!(err, RuntimeError::KernelNotAFile(_)), "{err}");
    }
}
