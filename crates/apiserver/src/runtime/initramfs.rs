//! The initramfs every machine boots: the static agent as `/init` and the kernel modules it
//! needs (virtio-mmio transport, disk, vsock, virtio-fs, network, balloon) with their
//! dependencies, in load order. Built once per (kernel, agent) pair and cached; each boot
//! appends a small second archive holding that machine's boot config (Linux unpacks
//! concatenated archives in order).

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use container_api::ApiError;
use sha2::Digest;

/// Modules the agent needs, by name.
const WANTED: &[&str] = &[
    "virtio_mmio",
    "virtio_blk",
    "vmw_vsock_virtio_transport",
    "virtiofs",
    "virtio_net",
    "virtio_balloon",
];

/// A built initramfs: its path and the module paths inside it, in load order.
#[derive(Debug, Clone)]
pub struct Initramfs {
    pub path: PathBuf,
    pub modules: Vec<String>,
}

fn internal(what: &str) -> impl FnOnce(std::io::Error) -> ApiError + '_ {
    move |e| ApiError::internal(format!("{what}: {e}"))
}

/// The names listed after `depends=` in a module's .modinfo.
fn depends(ko: &[u8]) -> Vec<String> {
    let key = b"depends=";
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

/// Module files under `modules/kernel` by normalised name.
fn index(modules: &Path) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![modules.join("kernel")];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(name) = p.file_name().map(|n| n.to_string_lossy().to_string())
                && let Some(stem) = name.strip_suffix(".ko")
            {
                out.insert(stem.replace('-', "_"), p);
            }
        }
    }
    out
}

/// The wanted modules and their dependencies, dependencies first; built-ins are skipped.
pub fn resolve(modules: &Path) -> Result<Vec<PathBuf>, ApiError> {
    let all = index(modules);
    let builtin: HashSet<String> = std::fs::read_to_string(modules.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| Path::new(l).file_stem())
        .map(|s| s.to_string_lossy().replace('-', "_"))
        .collect();
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    fn visit(
        name: &str,
        all: &BTreeMap<String, PathBuf>,
        builtin: &HashSet<String>,
        seen: &mut HashSet<String>,
        order: &mut Vec<PathBuf>,
    ) -> Result<(), ApiError> {
        if builtin.contains(name) || !seen.insert(name.to_string()) {
            return Ok(());
        }
        let path = all.get(name).ok_or_else(|| {
            ApiError::internal(format!(
                "the kernel has no module {name} (neither built in nor as a file)"
            ))
        })?;
        let bytes = std::fs::read(path).map_err(internal("reading a module"))?;
        for dep in depends(&bytes) {
            visit(&dep, all, builtin, seen, order)?;
        }
        order.push(path.clone());
        Ok(())
    }
    for w in WANTED {
        visit(w, &all, &builtin, &mut seen, &mut order)?;
    }
    Ok(order)
}

fn add_file<W: Write>(w: W, name: &str, mode: u32, data: &[u8]) -> std::io::Result<W> {
    let mut writer = cpio::newc::Builder::new(name)
        .mode(mode)
        .nlink(1)
        .write(w, data.len() as u32);
    writer.write_all(data)?;
    writer.finish()
}

fn add_dir<W: Write>(w: W, name: &str) -> std::io::Result<W> {
    cpio::newc::Builder::new(name)
        .mode(0o040755)
        .nlink(2)
        .write(w, 0)
        .finish()
}

/// Builds (or reuses) the cached initramfs for this kernel and agent.
pub fn build(
    cache: &Path,
    kernel_digest: &str,
    modules: Option<&Path>,
    agent: &Path,
) -> Result<Initramfs, ApiError> {
    let agent_bytes = std::fs::read(agent).map_err(|e| {
        ApiError::internal(format!(
            "reading the guest agent {}: {e} (build it with scripts/build.sh)",
            agent.display()
        ))
    })?;
    let module_files = match modules {
        Some(m) => resolve(m)?,
        None => Vec::new(),
    };
    let names: Vec<String> = module_files
        .iter()
        .map(|p| {
            format!(
                "/lib/modules/{}",
                p.file_name().expect("a file").to_string_lossy()
            )
        })
        .collect();
    let mut h = sha2::Sha256::new();
    h.update(kernel_digest.as_bytes());
    h.update(&agent_bytes);
    for n in &names {
        h.update(n.as_bytes());
    }
    let key = hex::encode(&h.finalize()[..12]);
    std::fs::create_dir_all(cache).map_err(internal("creating the initramfs cache"))?;
    let path = cache.join(format!("{key}.cpio"));
    if !path.exists() {
        let tmp =
            tempfile::NamedTempFile::new_in(cache).map_err(internal("creating the initramfs"))?;
        let mut w =
            std::io::BufWriter::new(tmp.reopen().map_err(internal("writing the initramfs"))?);
        for d in [
            "dev",
            "proc",
            "sys",
            "newroot",
            "container",
            "lib",
            "lib/modules",
        ] {
            w = add_dir(w, d).map_err(internal("writing the initramfs"))?;
        }
        w = add_file(w, "init", 0o100755, &agent_bytes)
            .map_err(internal("writing the initramfs"))?;
        for (file, name) in module_files.iter().zip(&names) {
            let bytes = std::fs::read(file).map_err(internal("reading a module"))?;
            w = add_file(w, name.trim_start_matches('/'), 0o100644, &bytes)
                .map_err(internal("writing the initramfs"))?;
        }
        let mut w = cpio::newc::trailer(w).map_err(internal("writing the initramfs"))?;
        w.flush().map_err(internal("writing the initramfs"))?;
        drop(w);
        tmp.persist(&path)
            .map_err(|e| ApiError::internal(format!("saving the initramfs: {e}")))?;
    }
    Ok(Initramfs {
        path,
        modules: names,
    })
}

/// Writes `base` followed by an archive holding the boot config, to `out`.
pub fn with_boot_config(base: &Path, boot_json: &[u8], out: &Path) -> Result<(), ApiError> {
    let mut bytes = std::fs::read(base).map_err(internal("reading the initramfs"))?;
    // Each archive starts on a 4-byte boundary.
    while bytes.len() % 4 != 0 {
        bytes.push(0);
    }
    let mut extra = add_file(Vec::new(), "container/boot.json", 0o100600, boot_json)
        .map_err(internal("writing the boot config"))?;
    extra = cpio::newc::trailer(extra).map_err(internal("writing the boot config"))?;
    bytes.extend_from_slice(&extra);
    std::fs::write(out, bytes).map_err(internal("writing the machine initramfs"))
}

#[cfg(test)]
mod tests {
    use super::depends;

    #[test]
    fn reads_module_dependencies_from_modinfo() {
        let ko = b"\x7fELF....\0license=GPL\0depends=virtio,virtio_ring\0vermagic=6.1\0";
        assert_eq!(depends(ko), ["virtio", "virtio_ring"]);
        assert!(depends(b"\0depends=\0").is_empty());
        assert!(depends(b"nothing here").is_empty());
    }
}
