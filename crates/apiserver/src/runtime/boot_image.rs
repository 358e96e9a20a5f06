//! The kernel file QEMU loads. A distribution kernel is a bzImage: real-mode setup code, a
//! decompressor, and the kernel proper compressed inside it. Under emulation the
//! decompressor is slow: every instruction of inflating tens of MB (and of relocating the
//! result) is translated by TCG before the kernel's own clock starts. When the kernel inside
//! is an ELF with a PVH entry point (the `XEN_ELFNOTE_PHYS32_ENTRY` note of `CONFIG_PVH`,
//! which Debian's and Ubuntu's kernels have), QEMU boots it directly, so the service unpacks
//! it once per kernel, natively, and the machines boot that. Any other kernel is booted as
//! given. The only thing lost is the guest kernel's address randomisation, which the
//! decompressor applies; the guest is not a trust boundary of ours (its user has root in it).
//!
//! Images are kept in a cache directory as `<key>.vmlinux` (or `<key>.bzimage`, a copy of a
//! kernel that cannot be unpacked), one per kernel digest, mode 0644: the VMM runs as the
//! VM's own user and is handed the open file, which it reopens through `/proc/self/fd`.
//! Nothing per VM is copied.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sha2::Digest;

use super::RuntimeError;
use super::kernel::Kernel;
use super::process::ProcessId;

/// The largest kernel unpacked (Debian's 6.1 kernel is 51 MiB unpacked).
const MAX_UNPACKED: usize = 512 << 20;
/// `XEN_ELFNOTE_PHYS32_ENTRY`: the 32-bit entry point of a PVH boot.
const PVH_ENTRY_NOTE: u32 = 18;
/// An LZ4 "legacy" block never unpacks to more than this (the kernel's `lz4 -l` payload).
const LZ4_LEGACY_BLOCK: usize = 8 << 20;

/// The file QEMU should load for `kernel`, made once per kernel digest in `cache`.
pub fn prepare(cache: &Path, kernel: &Kernel) -> Result<PathBuf, RuntimeError> {
    let key = hex::encode(&sha2::Sha256::digest(kernel.digest.as_bytes())[..16]);
    let unpacked = cache.join(format!("{key}.vmlinux"));
    let given = cache.join(format!("{key}.bzimage"));
    for p in [&unpacked, &given] {
        if p.exists() {
            return Ok(p.clone());
        }
    }
    let bytes = std::fs::read(&kernel.vmlinuz)
        .map_err(RuntimeError::io("reading the kernel", &kernel.vmlinuz))?;
    let (path, contents) = match unpack_pvh(&bytes) {
        Ok(elf) => (unpacked, elf),
        Err(why) => {
            tracing::info!(kernel = %kernel.vmlinuz.display(), "booting the kernel as given: {why}");
            (given, bytes)
        }
    };
    std::fs::create_dir_all(cache).map_err(RuntimeError::io("creating", cache))?;
    let write = || -> std::io::Result<()> {
        let tmp = tempfile::NamedTempFile::new_in(cache)?;
        std::fs::write(tmp.path(), &contents)?;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))?;
        tmp.persist(&path).map_err(|e| e.error)?;
        Ok(())
    };
    write().map_err(RuntimeError::io("writing", &path))?;
    Ok(path)
}

/// The ELF kernel inside a bzImage, if it has a PVH entry point; else why not.
fn unpack_pvh(bz: &[u8]) -> Result<Vec<u8>, String> {
    let elf = unpack(bz)?;
    if has_pvh_entry(&elf) {
        Ok(elf)
    } else {
        Err("the kernel has no PVH entry point".into())
    }
}

/// The payload of a bzImage (boot protocol 2.08 or later), decompressed.
fn unpack(bz: &[u8]) -> Result<Vec<u8>, String> {
    let u32_at = |at: usize| {
        bz.get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
    };
    if bz.get(0x202..0x206) != Some(b"HdrS") {
        return Err("not a bzImage".into());
    }
    let version = bz
        .get(0x206..0x208)
        .map(|b| u16::from_le_bytes([b[0], b[1]]));
    if version.is_none_or(|v| v < 0x208) {
        return Err("boot protocol older than 2.08".into());
    }
    let setup_sectors = match bz[0x1f1] {
        0 => 4,
        n => n as usize,
    };
    let (offset, length) = (u32_at(0x248), u32_at(0x24c));
    let start = (setup_sectors + 1) * 512 + offset.unwrap_or(0);
    let payload = length
        .and_then(|l| bz.get(start..start + l))
        .filter(|p| p.len() > 8)
        .ok_or("the payload lies outside the file")?;
    // Every compressor's payload ends with the unpacked size (gzip's own trailer; the
    // kernel's build appends it for the others).
    let size = u32::from_le_bytes(payload[payload.len() - 4..].try_into().expect("4 bytes"));
    let size = size as usize;
    if size > MAX_UNPACKED {
        return Err(format!("an unpacked size of {size} bytes"));
    }
    let mut out = Vec::with_capacity(size);
    let read = match payload {
        [0x1f, 0x8b, ..] => flate2::read::GzDecoder::new(payload).read_to_end(&mut out),
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => {
            liblzma::read::XzDecoder::new(payload).read_to_end(&mut out)
        }
        [0x5d, 0, 0, ..] => liblzma::stream::Stream::new_lzma_decoder(u64::MAX)
            .map_err(std::io::Error::other)
            .and_then(|s| liblzma::read::XzDecoder::new_stream(payload, s).read_to_end(&mut out)),
        [0x28, 0xb5, 0x2f, 0xfd, ..] => zstd::stream::read::Decoder::with_buffer(payload)
            .map(zstd::stream::read::Decoder::single_frame)
            .and_then(|mut d| d.read_to_end(&mut out)),
        [0x02, 0x21, 0x4c, 0x18, ..] => lz4_legacy(&payload[4..], size, &mut out),
        _ => return Err("a compression this service does not unpack".into()),
    };
    read.map_err(|e| format!("unpacking: {e}"))?;
    if out.len() != size {
        return Err(format!("unpacked {} bytes, not {size}", out.len()));
    }
    Ok(out)
}

/// LZ4's legacy frame (what the kernel's `lz4 -l` writes): blocks, each after its
/// compressed length, until `size` bytes are out. The lz4_flex crate reads LZ4 blocks but
/// not this framing, which is only these few lines.
fn lz4_legacy(mut input: &[u8], size: usize, out: &mut Vec<u8>) -> std::io::Result<usize> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    while out.len() < size {
        let (len, rest) = input
            .split_first_chunk::<4>()
            .ok_or_else(|| bad("a truncated LZ4 block"))?;
        let len = u32::from_le_bytes(*len) as usize;
        let block = rest
            .get(..len)
            .ok_or_else(|| bad("a truncated LZ4 block"))?;
        let at = out.len();
        out.resize(at + LZ4_LEGACY_BLOCK.min(size - at), 0);
        let n = lz4_flex::block::decompress_into(block, &mut out[at..])
            .map_err(|e| bad(&e.to_string()))?;
        out.truncate(at + n);
        input = &rest[len..];
    }
    Ok(out.len())
}

/// Whether a 64-bit little-endian ELF file has the PVH entry note.
fn has_pvh_entry(elf: &[u8]) -> bool {
    use object::elf::{FileHeader64, PT_NOTE};
    use object::read::elf::{FileHeader, ProgramHeader};
    let Ok(header) = FileHeader64::<object::LittleEndian>::parse(elf) else {
        return false;
    };
    let endian = object::LittleEndian;
    let Ok(segments) = header.program_headers(endian, elf) else {
        return false;
    };
    segments
        .iter()
        .filter(|s| s.p_type(endian) == PT_NOTE)
        .filter_map(|s| s.notes(endian, elf).ok().flatten())
        .any(|mut notes| {
            std::iter::from_fn(|| notes.next().ok().flatten())
                .any(|n| n.name() == b"Xen" && n.n_type(endian) == PVH_ENTRY_NOTE)
        })
}

/// Gives back what QEMU holds of the files it booted from, once the guest is up. QEMU maps
/// the kernel (an ELF whole: 48 MiB of Debian's) and the initrd and keeps them mapped for a
/// machine reset, which never comes: it runs with `-no-reboot`, so a reboot inside ends it
/// and the service starts a new QEMU. Those pages were counted in the VM's memory (its PSS,
/// `machine stats`) for nothing; they are paged out of `qemu` (process_madvise(2)), and the
/// kernel, shared by every machine's next boot, is read back into the host's page cache,
/// which the host may drop when it needs the memory. Returns the bytes asked for.
pub fn release(qemu: ProcessId, kernel: &Path, initrd: &Path) -> std::io::Result<usize> {
    let pid = rustix::process::Pid::from_raw(qemu.pid())
        .ok_or_else(|| std::io::Error::other("not a pid"))?;
    let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())?;
    // Opened first: if the pid was reused, the advice goes to the exited process and fails.
    if !qemu.alive() {
        return Ok(0);
    }
    let files: Vec<PathBuf> = [kernel, initrd]
        .iter()
        .filter_map(|f| f.canonicalize().ok())
        .collect();
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", qemu.pid()))?;
    let ranges = mappings_of(&maps, &files);
    if ranges.is_empty() {
        return Ok(0);
    }
    let asked = ranges.iter().map(|r| r.1).sum();
    super::sys::page_out(&pidfd, &ranges)?;
    if let Ok(f) = std::fs::File::open(kernel) {
        let _ = rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::WillNeed);
    }
    Ok(asked)
}

/// The (start, length) of each mapping in `maps` (a `/proc/PID/maps`) of one of `files`.
fn mappings_of(maps: &str, files: &[PathBuf]) -> Vec<(usize, usize)> {
    maps.lines()
        .filter_map(|line| {
            // start-end perms offset dev inode path; the path may hold spaces.
            let mut fields = line.splitn(6, ' ');
            let range = fields.next()?;
            let path = fields.nth(4)?.trim_start();
            files.iter().any(|f| f.as_os_str() == path).then_some(())?;
            let (start, end) = range.split_once('-')?;
            let start = usize::from_str_radix(start, 16).ok()?;
            let end = usize::from_str_radix(end, 16).ok()?;
            (end > start).then_some((start, end - start))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 file with one PT_NOTE segment holding a note `name`/`kind`.
    fn elf_with_note(name: &[u8], kind: u32) -> Vec<u8> {
        let mut note = Vec::new();
        note.extend((name.len() as u32 + 1).to_le_bytes());
        note.extend(4u32.to_le_bytes());
        note.extend(kind.to_le_bytes());
        note.extend(name);
        note.push(0);
        note.resize(note.len().next_multiple_of(4), 0);
        note.extend(0x0100_0000u32.to_le_bytes());
        let mut f = vec![0u8; 64 + 56];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2; // 64-bit
        f[5] = 1; // little-endian
        f[6] = 1;
        f[16..18].copy_from_slice(&2u16.to_le_bytes()); // executable
        f[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[32..40].copy_from_slice(&64u64.to_le_bytes()); // program headers at 64
        f[52..54].copy_from_slice(&64u16.to_le_bytes());
        f[54..56].copy_from_slice(&56u16.to_le_bytes());
        f[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = &mut f[64..];
        ph[..4].copy_from_slice(&PT_NOTE_TYPE.to_le_bytes());
        ph[8..16].copy_from_slice(&120u64.to_le_bytes()); // offset
        ph[32..40].copy_from_slice(&(note.len() as u64).to_le_bytes());
        ph[40..48].copy_from_slice(&(note.len() as u64).to_le_bytes());
        ph[48..56].copy_from_slice(&4u64.to_le_bytes());
        f.extend(note);
        f
    }
    const PT_NOTE_TYPE: u32 = 4;

    /// A bzImage around `payload`: the header fields the boot protocol defines, nothing else.
    fn bzimage(payload: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 5 * 512];
        b[0x1f1] = 4;
        b[0x202..0x206].copy_from_slice(b"HdrS");
        b[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        b[0x248..0x24c].copy_from_slice(&16u32.to_le_bytes());
        b[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        b.extend([0u8; 16]);
        b.extend(payload);
        b.extend([0u8; 100]);
        b
    }

    fn with_size(mut compressed: Vec<u8>, size: usize) -> Vec<u8> {
        compressed.extend((size as u32).to_le_bytes());
        compressed
    }

    fn lz4_legacy_of(data: &[u8]) -> Vec<u8> {
        let mut out = vec![0x02, 0x21, 0x4c, 0x18];
        for chunk in data.chunks(LZ4_LEGACY_BLOCK) {
            let block = lz4_flex::block::compress(chunk);
            out.extend((block.len() as u32).to_le_bytes());
            out.extend(block);
        }
        with_size(out, data.len())
    }

    #[test]
    fn unpacks_a_pvh_kernel_from_each_compression() {
        let mut elf = elf_with_note(b"Xen", PVH_ENTRY_NOTE);
        elf.extend(std::iter::repeat_n(0x90u8, 9 << 20)); // more than one LZ4 block
        let gz = {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut e, &elf).unwrap();
            e.finish().unwrap()
        };
        let xz = {
            let mut out = Vec::new();
            liblzma::read::XzEncoder::new(&elf[..], 1)
                .read_to_end(&mut out)
                .unwrap();
            with_size(out, elf.len())
        };
        let zst = with_size(zstd::encode_all(&elf[..], 1).unwrap(), elf.len());
        for (name, payload) in [
            ("gzip", gz),
            ("xz", xz),
            ("zstd", zst),
            ("lz4", lz4_legacy_of(&elf)),
        ] {
            assert_eq!(unpack_pvh(&bzimage(&payload)).as_ref(), Ok(&elf), "{name}");
        }
    }

    #[test]
    fn a_kernel_without_a_pvh_entry_or_a_known_format_is_booted_as_given() {
        let other = elf_with_note(b"Xen", 17);
        let payload = with_size(zstd::encode_all(&other[..], 1).unwrap(), other.len());
        assert!(
            unpack_pvh(&bzimage(&payload))
                .unwrap_err()
                .contains("no PVH")
        );
        assert!(
            unpack_pvh(b"not a kernel at all")
                .unwrap_err()
                .contains("not a bzImage")
        );
        let bzip2 = with_size(b"BZh91AY&SY....".to_vec(), 100);
        assert!(
            unpack_pvh(&bzimage(&bzip2))
                .unwrap_err()
                .contains("compression")
        );
        // A payload that claims to unpack to more than any kernel.
        let huge = with_size(vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0], MAX_UNPACKED + 1);
        assert!(
            unpack_pvh(&bzimage(&huge))
                .unwrap_err()
                .contains("unpacked size")
        );
        // A payload length past the end of the file.
        let mut cut = bzimage(&payload);
        cut[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(unpack_pvh(&cut).unwrap_err().contains("outside"));
        // A corrupt LZ4 stream is an error, not a panic.
        let mut lz4 = lz4_legacy_of(&other);
        lz4[10] ^= 0xff;
        lz4[12] = 0xff;
        assert!(unpack_pvh(&bzimage(&lz4)).is_err());
    }

    #[test]
    fn the_image_is_made_once_per_kernel_and_readable_by_every_vm_user() {
        let dir = tempfile::tempdir().unwrap();
        let elf = elf_with_note(b"Xen", PVH_ENTRY_NOTE);
        let vmlinuz = dir.path().join("vmlinuz");
        std::fs::write(&vmlinuz, bzimage(&lz4_legacy_of(&elf))).unwrap();
        std::fs::set_permissions(&vmlinuz, std::fs::Permissions::from_mode(0o600)).unwrap();
        let kernel = Kernel {
            vmlinuz: vmlinuz.clone(),
            modules: None,
            digest: "sha256:1".into(),
        };
        let cache = dir.path().join("cache");
        let path = prepare(&cache, &kernel).unwrap();
        assert!(path.to_string_lossy().ends_with(".vmlinux"));
        assert_eq!(std::fs::read(&path).unwrap(), elf);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
        // Made once: the kernel file is not read again.
        std::fs::remove_file(&vmlinuz).unwrap();
        assert_eq!(prepare(&cache, &kernel).unwrap(), path);
        // Another kernel that cannot be unpacked is copied as given.
        std::fs::write(&vmlinuz, b"some other kernel").unwrap();
        let other = Kernel {
            digest: "sha256:2".into(),
            ..kernel
        };
        let given = prepare(&cache, &other).unwrap();
        assert!(given.to_string_lossy().ends_with(".bzimage"));
        assert_eq!(std::fs::read(&given).unwrap(), b"some other kernel");
    }

    #[test]
    fn the_mappings_of_the_boot_files_are_found_and_no_others() {
        let maps = "\
55d0c0000000-55d0c0200000 r--p 00000000 fe:01 123 /usr/bin/qemu-system-x86_64
7f0000000000-7f0003000000 rw-p 00000000 fe:01 77 /var/lib/container/boot-kernels/ab.vmlinux
7f0003000000-7f0003001000 rw-p 03000000 fe:01 77 /var/lib/container/boot-kernels/ab.vmlinux
7f1000000000-7f1000500000 r--p 00000000 00:1a 9 /run/container/vm/x/vmm/initrd.img
7f2000000000-7f2000500000 r--p 00000000 00:1a 10 /run/container/vm/y/vmm/initrd.img
7f3000000000-7f3004000000 rwxp 00000000 00:00 0 
7f4000000000-7f4000001000 r--p 00000000 00:1a 11 /tmp/a dir/initrd.img (deleted)
";
        let files = [
            PathBuf::from("/var/lib/container/boot-kernels/ab.vmlinux"),
            PathBuf::from("/run/container/vm/x/vmm/initrd.img"),
        ];
        assert_eq!(
            mappings_of(maps, &files),
            vec![
                (0x7f00_0000_0000, 0x300_0000),
                (0x7f00_0300_0000, 0x1000),
                (0x7f10_0000_0000, 0x50_0000)
            ]
        );
        assert!(mappings_of(maps, &[PathBuf::from("/tmp/a dir/initrd.img")]).is_empty());
    }
}
