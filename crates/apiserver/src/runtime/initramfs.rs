//! The initramfs every machine boots: the static agent as `/init`, a `/dev/console` node, and
//! the kernel modules the agent needs (virtio-mmio transport, disk, vsock, fuse and virtio-fs,
//! network, balloon, TCP socket diagnostics) with their dependencies in load order, skipping what the kernel has built
//! in (`modules.builtin`). Dependencies come from `modules.dep` when the tree has one, else
//! from each module's `.modinfo` (distribution packages ship no `modules.dep`: `depmod`
//! writes it at install). Compressed modules are stored decompressed, which every kernel
//! loads. The archive is built once per (kernel digest, agent digest) and cached as
//! `<cache>/<hash>.cpio`; each boot appends a second small archive with that machine's
//! `/container/boot.json` (Linux unpacks concatenated archives in order).

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::Digest;

use super::RuntimeError;
use super::kernel::Kernel;

/// Modules the agent needs, by name, and whether a machine can boot without them.
const WANTED: &[(&str, bool)] = &[
    ("virtio_mmio", true),
    ("virtio_blk", true),
    ("vmw_vsock_virtio_transport", true),
    ("fuse", true),
    ("virtiofs", true),
    ("virtio_net", false),
    ("virtio_balloon", false),
    // The listening TCP sockets and bound UDP sockets the agent reports for port forwarding
    // (sock_diag); without them the agent reads /proc/net/tcp and /proc/net/udp instead.
    ("tcp_diag", false),
    ("udp_diag", false),
];

/// A built initramfs: its path and the module paths inside it, in load order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Initramfs {
    pub path: PathBuf,
    pub modules: Vec<String>,
}

/// A module file found in the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    pub name: String,
    pub path: PathBuf,
}

/// A module's name as the kernel knows it: file stem without compression suffix, `-` as `_`.
fn module_name(file: &str) -> Option<String> {
    let stem = ["", ".xz", ".zst", ".gz"]
        .iter()
        .find_map(|c| file.strip_suffix(&format!(".ko{c}")))?;
    Some(stem.replace('-', "_"))
}

/// The names listed after `depends=` in a module's .modinfo.
fn modinfo_depends(ko: &[u8]) -> Vec<String> {
    let key = b"\0depends=";
    ko.windows(key.len())
        .position(|w| w == key)
        .map(|i| {
            let rest = &ko[i + key.len()..];
            let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
            String::from_utf8_lossy(&rest[..end])
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|s| s.replace('-', "_"))
                .collect()
        })
        .unwrap_or_default()
}

/// `modules.dep`: module name → names of all the modules it needs.
fn parse_modules_dep(text: &str) -> HashMap<String, Vec<String>> {
    let name = |p: &str| {
        Path::new(p)
            .file_name()
            .and_then(|n| module_name(&n.to_string_lossy()))
    };
    text.lines()
        .filter_map(|l| {
            let (module, deps) = l.split_once(':')?;
            Some((
                name(module.trim())?,
                deps.split_whitespace().filter_map(name).collect(),
            ))
        })
        .collect()
}

/// Module files under `<modules>/kernel` (and `updates`, `extra`) by name.
fn index(modules: &Path) -> HashMap<String, PathBuf> {
    let mut out = HashMap::new();
    let mut stack: Vec<PathBuf> = ["kernel", "updates", "extra"]
        .iter()
        .map(|d| modules.join(d))
        .collect();
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p);
            } else if let Some(name) = module_name(&e.file_name().to_string_lossy()) {
                out.insert(name, p);
            }
        }
    }
    out
}

/// A module's bytes, decompressed.
fn read_module(path: &Path) -> Result<Vec<u8>, RuntimeError> {
    let file = std::fs::File::open(path).map_err(RuntimeError::io("reading module", path))?;
    let mut out = Vec::new();
    let name = path.to_string_lossy();
    let read = if name.ends_with(".zst") {
        zstd::stream::read::Decoder::new(file).and_then(|mut d| d.read_to_end(&mut out))
    } else if name.ends_with(".gz") {
        flate2::read::GzDecoder::new(file).read_to_end(&mut out)
    } else if name.ends_with(".xz") {
        liblzma::read::XzDecoder::new(file).read_to_end(&mut out)
    } else {
        std::io::BufReader::new(file).read_to_end(&mut out)
    };
    read.map_err(RuntimeError::io("decompressing module", path))?;
    Ok(out)
}

/// What dependency resolution reads from a module tree.
struct Tree<'a> {
    root: &'a Path,
    files: HashMap<String, PathBuf>,
    builtin: HashSet<String>,
    modules_dep: Option<HashMap<String, Vec<String>>>,
}

impl Tree<'_> {
    fn deps(&self, name: &str, path: &Path) -> Result<Vec<String>, RuntimeError> {
        match self.modules_dep.as_ref().and_then(|d| d.get(name)) {
            Some(d) => Ok(d.clone()),
            None => Ok(modinfo_depends(&read_module(path)?)),
        }
    }

    /// Depth first: dependencies are pushed before the module; each module once.
    fn visit(
        &self,
        name: &str,
        required: bool,
        seen: &mut HashSet<String>,
        order: &mut Vec<Module>,
    ) -> Result<(), RuntimeError> {
        if self.builtin.contains(name) || !seen.insert(name.to_string()) {
            return Ok(());
        }
        let Some(path) = self.files.get(name) else {
            if required {
                return Err(RuntimeError::MissingModule {
                    name: name.to_string(),
                    modules: self.root.to_path_buf(),
                });
            }
            tracing::warn!(module = name, "the kernel lacks an optional module");
            return Ok(());
        };
        for dep in self.deps(name, path)? {
            // A module's own dependencies are always required.
            self.visit(&dep, true, seen, order)?;
        }
        order.push(Module {
            name: name.to_string(),
            path: path.clone(),
        });
        Ok(())
    }
}

/// The wanted modules and their dependencies, dependencies first; built-ins are skipped.
pub fn resolve(modules: &Path) -> Result<Vec<Module>, RuntimeError> {
    let tree = Tree {
        root: modules,
        files: index(modules),
        builtin: std::fs::read_to_string(modules.join("modules.builtin"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| Path::new(l).file_name())
            .filter_map(|n| module_name(&n.to_string_lossy()))
            .collect(),
        modules_dep: std::fs::read_to_string(modules.join("modules.dep"))
            .ok()
            .map(|t| parse_modules_dep(&t)),
    };
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    for (wanted, required) in WANTED {
        tree.visit(wanted, *required, &mut seen, &mut order)?;
    }
    Ok(order)
}

/// Writes newc archive members with distinct inode numbers.
struct Archive<W: Write> {
    out: Option<W>,
    ino: u32,
}

impl<W: Write> Archive<W> {
    fn new(out: W) -> Self {
        Archive {
            out: Some(out),
            ino: 1,
        }
    }

    fn entry(&mut self, builder: cpio::newc::Builder, data: &[u8]) -> std::io::Result<()> {
        self.ino += 1;
        let out = self.out.take().expect("the archive is open");
        let mut w = builder.ino(self.ino).write(
            out,
            u32::try_from(data.len()).map_err(std::io::Error::other)?,
        );
        w.write_all(data)?;
        self.out = Some(w.finish()?);
        Ok(())
    }

    fn dir(&mut self, name: &str) -> std::io::Result<()> {
        self.entry(cpio::newc::Builder::new(name).mode(0o040755).nlink(2), &[])
    }

    fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> std::io::Result<()> {
        self.entry(
            cpio::newc::Builder::new(name)
                .mode(0o100000 | mode)
                .nlink(1),
            data,
        )
    }

    fn char_device(&mut self, name: &str, major: u32, minor: u32) -> std::io::Result<()> {
        self.entry(
            cpio::newc::Builder::new(name)
                .mode(0o020600)
                .nlink(1)
                .rdev_major(major)
                .rdev_minor(minor),
            &[],
        )
    }

    fn finish(mut self) -> std::io::Result<W> {
        let out = self.out.take().expect("the archive is open");
        cpio::newc::trailer(out)
    }
}

/// Builds (or reuses) the cached initramfs for this kernel and agent.
pub fn build(cache: &Path, kernel: &Kernel, agent: &Path) -> Result<Initramfs, RuntimeError> {
    let agent_bytes =
        std::fs::read(agent).map_err(RuntimeError::io("reading the guest agent", agent))?;
    let modules = match &kernel.modules {
        Some(m) => resolve(m)?,
        None => Vec::new(),
    };
    let names: Vec<String> = modules
        .iter()
        .map(|m| format!("/lib/modules/{}.ko", m.name))
        .collect();
    let mut h = sha2::Sha256::new();
    h.update(kernel.digest.as_bytes());
    h.update([0]);
    h.update(sha2::Sha256::digest(&agent_bytes));
    for n in &names {
        h.update(n.as_bytes());
        h.update([0]);
    }
    let key = hex::encode(&h.finalize()[..16]);
    std::fs::create_dir_all(cache).map_err(RuntimeError::io("creating", cache))?;
    let path = cache.join(format!("{key}.cpio"));
    if !path.exists() {
        let write = || -> std::io::Result<()> {
            let tmp = tempfile::NamedTempFile::new_in(cache)?;
            let mut a = Archive::new(std::io::BufWriter::new(tmp.reopen()?));
            for d in [
                "dev",
                "proc",
                "sys",
                "newroot",
                "container",
                "lib",
                "lib/modules",
            ] {
                a.dir(d)?;
            }
            // The kernel opens /dev/console for init's stdio before anything mounts /dev.
            a.char_device("dev/console", 5, 1)?;
            a.file("init", 0o755, &agent_bytes)?;
            for (m, name) in modules.iter().zip(&names) {
                let bytes = read_module(&m.path).map_err(std::io::Error::other)?;
                a.file(name.trim_start_matches('/'), 0o644, &bytes)?;
            }
            let mut w = a.finish()?;
            w.flush()?;
            w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            tmp.persist(&path).map_err(|e| e.error)?;
            Ok(())
        };
        write().map_err(RuntimeError::io("writing the initramfs", &path))?;
    }
    Ok(Initramfs {
        path,
        modules: names,
    })
}

/// Writes `base` followed by an archive holding the boot config, to `out`.
pub fn with_boot_config(base: &Path, boot_json: &[u8], out: &Path) -> Result<(), RuntimeError> {
    let mut bytes = std::fs::read(base).map_err(RuntimeError::io("reading the initramfs", base))?;
    // Each archive starts on a 4-byte boundary.
    bytes.resize(bytes.len().next_multiple_of(4), 0);
    let mut a = Archive::new(bytes);
    a.file("container/boot.json", 0o600, boot_json)
        .map_err(RuntimeError::io("writing the boot config into", out))?;
    let bytes = a
        .finish()
        .map_err(RuntimeError::io("writing the boot config into", out))?;
    std::fs::write(out, bytes).map_err(RuntimeError::io("writing", out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_module_dependencies_from_modinfo() {
        let ko = b"\x7fELF....\0license=GPL\0depends=virtio,virtio_ring\0vermagic=6.1\0";
        assert_eq!(modinfo_depends(ko), ["virtio", "virtio_ring"]);
        assert!(modinfo_depends(b"\0depends=\0").is_empty());
        assert!(modinfo_depends(b"nothing here").is_empty());
    }

    #[test]
    fn module_names_drop_compression_and_dashes() {
        assert_eq!(module_name("virtio-blk.ko").as_deref(), Some("virtio_blk"));
        assert_eq!(module_name("fuse.ko.zst").as_deref(), Some("fuse"));
        assert_eq!(module_name("vsock.ko.xz").as_deref(), Some("vsock"));
        assert_eq!(module_name("modules.dep"), None);
    }

    /// A module tree: `(relative path, depends)`, as modinfo sections in fake module files.
    fn tree(dir: &Path, modules: &[(&str, &str)], builtin: &[&str]) {
        for (path, deps) in modules {
            let p = dir.join("kernel").join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            let body = format!("\x7fELF\0license=GPL\0depends={deps}\0vermagic=6.1\0");
            if path.ends_with(".zst") {
                std::fs::write(&p, zstd::encode_all(body.as_bytes(), 3).unwrap()).unwrap();
            } else {
                std::fs::write(&p, body).unwrap();
            }
        }
        let builtin: Vec<String> = builtin.iter().map(|b| format!("kernel/{b}\n")).collect();
        std::fs::write(dir.join("modules.builtin"), builtin.concat()).unwrap();
    }

    const DEBIAN_LIKE: &[(&str, &str)] = &[
        ("drivers/virtio/virtio_ring.ko", ""),
        ("drivers/virtio/virtio.ko", "virtio_ring"),
        ("drivers/virtio/virtio_mmio.ko", "virtio,virtio_ring"),
        ("drivers/block/virtio_blk.ko", "virtio,virtio_ring"),
        ("net/vmw_vsock/vsock.ko", ""),
        (
            "net/vmw_vsock/vmw_vsock_virtio_transport_common.ko",
            "vsock",
        ),
        (
            "net/vmw_vsock/vmw_vsock_virtio_transport.ko",
            "vmw_vsock_virtio_transport_common,virtio,virtio_ring,vsock",
        ),
        ("fs/fuse/fuse.ko.zst", ""),
        ("fs/fuse/virtiofs.ko", "fuse,virtio,virtio_ring"),
        (
            "drivers/net/virtio_net.ko",
            "net_failover,virtio,virtio_ring",
        ),
        ("drivers/net/net_failover.ko", "failover"),
        ("net/core/failover.ko", ""),
    ];

    fn names(m: &[Module]) -> Vec<&str> {
        m.iter().map(|m| m.name.as_str()).collect()
    }

    #[test]
    fn resolves_dependencies_first_and_skips_builtins() {
        let dir = tempfile::tempdir().unwrap();
        tree(
            dir.path(),
            DEBIAN_LIKE,
            &["drivers/virtio/virtio_balloon.ko"],
        );
        let order = resolve(dir.path()).unwrap();
        let n = names(&order);
        let pos = |m: &str| {
            n.iter()
                .position(|x| *x == m)
                .unwrap_or_else(|| panic!("{m} in {n:?}"))
        };
        for (module, dep) in [
            ("virtio", "virtio_ring"),
            ("virtio_mmio", "virtio"),
            (
                "vmw_vsock_virtio_transport",
                "vmw_vsock_virtio_transport_common",
            ),
            ("vmw_vsock_virtio_transport_common", "vsock"),
            ("virtiofs", "fuse"),
            ("virtio_net", "net_failover"),
            ("net_failover", "failover"),
        ] {
            assert!(pos(dep) < pos(module), "{dep} before {module} in {n:?}");
        }
        assert!(!n.contains(&"virtio_balloon"), "built in");
        assert_eq!(n.len(), 12, "each module once: {n:?}");
    }

    #[test]
    fn prefers_modules_dep_and_reports_a_missing_required_module() {
        let dir = tempfile::tempdir().unwrap();
        tree(dir.path(), DEBIAN_LIKE, &[]);
        // modules.dep says virtio_blk also needs `failover` (modinfo does not).
        std::fs::write(
            dir.path().join("modules.dep"),
            "kernel/drivers/block/virtio_blk.ko: kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko\n",
        )
        .unwrap();
        let n: Vec<String> = resolve(dir.path())
            .unwrap()
            .into_iter()
            .map(|m| m.name)
            .collect();
        let blk = n.iter().position(|x| x == "virtio_blk").unwrap();
        assert!(
            n.iter().position(|x| x == "failover").unwrap() < blk,
            "{n:?}"
        );

        let dir = tempfile::tempdir().unwrap();
        tree(dir.path(), &DEBIAN_LIKE[..4], &[]);
        let err = resolve(dir.path()).unwrap_err();
        assert!(
            matches!(&err, RuntimeError::MissingModule { name, .. } if name == "vsock" || name == "vmw_vsock_virtio_transport"),
            "{err}"
        );
    }

    /// Entries of a (possibly concatenated) newc archive: name → data.
    fn unpack(mut bytes: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut out = Vec::new();
        loop {
            while bytes.first() == Some(&0) {
                bytes = &bytes[1..];
            }
            if bytes.is_empty() {
                return out;
            }
            let mut r = cpio::NewcReader::new(bytes).unwrap();
            if r.entry().is_trailer() {
                bytes = r.finish().unwrap();
                continue;
            }
            let (name, mode) = (r.entry().name().to_string(), r.entry().mode());
            let mut data = Vec::new();
            r.read_to_end(&mut data).unwrap();
            out.push((name, mode, data));
            bytes = r.finish().unwrap();
        }
    }

    #[test]
    fn archives_hold_the_agent_modules_decompressed_and_the_boot_config() {
        let dir = tempfile::tempdir().unwrap();
        let modules = dir.path().join("modules");
        tree(&modules, DEBIAN_LIKE, &[]);
        let agent = dir.path().join("agent");
        std::fs::write(&agent, b"agent binary").unwrap();
        let kernel = Kernel {
            vmlinuz: dir.path().join("vmlinuz"),
            modules: Some(modules),
            digest: "sha256:k".into(),
        };
        let cache = dir.path().join("cache");
        let built = build(&cache, &kernel, &agent).unwrap();
        assert_eq!(build(&cache, &kernel, &agent).unwrap(), built, "cached");
        std::fs::write(&agent, b"another agent").unwrap();
        assert_ne!(
            build(&cache, &kernel, &agent).unwrap().path,
            built.path,
            "keyed by agent"
        );
        assert!(built.modules.contains(&"/lib/modules/fuse.ko".to_string()));

        let out = dir.path().join("initrd");
        with_boot_config(&built.path, b"{\"boot\":1}", &out).unwrap();
        let entries = unpack(&std::fs::read(&out).unwrap());
        let get = |n: &str| {
            entries
                .iter()
                .find(|e| e.0 == n)
                .unwrap_or_else(|| panic!("{n}"))
        };
        assert_eq!(get("init").2, b"agent binary");
        assert_eq!(get("init").1 & 0o777, 0o755);
        assert_eq!(get("dev/console").1 & 0o170000, 0o020000);
        assert!(
            get("lib/modules/fuse.ko").2.starts_with(b"\x7fELF"),
            "decompressed"
        );
        assert_eq!(get("container/boot.json").2, b"{\"boot\":1}");
    }
}
