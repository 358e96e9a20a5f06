//! QEMU's `microvm` as the [`Vmm`]: one `qemu-system-x86_64` per running machine, with guest
//! memory in a shared memfd (vhost-user devices map it), virtio-mmio devices (found by the
//! guest through ACPI): virtio-blk for the machine disk, vhost-user vsock and one vhost-user
//! fs per share, a balloon with free-page reporting (memory the guest frees goes back to the
//! host), an optional tap, the serial console to a file and a QMP socket. Acceleration is KVM
//! when it can run a standard guest kernel, TCG otherwise. Every file and socket QEMU uses
//! besides its working directory comes as a descriptor: files through `-add-fd` and
//! `/dev/fdset/N`, sockets and the tap as `fd=N`, the kernel as `/proc/self/fd/N`.

use std::os::fd::{OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;
use std::os::fd::AsFd;

use super::qmp::Qmp;
use super::vmm::{Launch, Vmm};
use crate::config::Virtualization;

/// The accelerator and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accel {
    pub kvm: bool,
    pub reason: String,
}

/// What the host offers, for [`choose_accel`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostKvm {
    /// `/sys/module/kvm_pvm` exists: KVM is nested PVM, which hangs standard guest kernels.
    pub pvm: bool,
    /// `/dev/kvm` opens read-write.
    pub usable: bool,
}

impl HostKvm {
    pub fn probe() -> Self {
        HostKvm {
            pvm: Path::new("/sys/module/kvm_pvm").exists(),
            usable: std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .is_ok(),
        }
    }
}

/// The accelerator for a setting on a host.
pub fn choose_accel(setting: Virtualization, host: HostKvm) -> Accel {
    let (kvm, reason) = match setting {
        Virtualization::Kvm => (true, "kvm (configured)"),
        Virtualization::Tcg => (false, "tcg (configured)"),
        Virtualization::Auto if host.pvm => (
            false,
            "tcg (KVM here is nested PVM, which cannot run a standard guest kernel)",
        ),
        Virtualization::Auto if host.usable => (true, "kvm"),
        Virtualization::Auto => (false, "tcg (/dev/kvm is missing or cannot be opened)"),
    };
    Accel {
        kvm,
        reason: reason.into(),
    }
}

/// [`choose_accel`] on this host.
pub fn detect_accel(setting: Virtualization) -> Accel {
    choose_accel(setting, HostKvm::probe())
}

/// QEMU's microvm.
#[derive(Debug, Clone)]
pub struct Qemu {
    pub binary: PathBuf,
    pub accel: Accel,
    /// The host's TSC frequency, given to TCG guests (see [`cmdline`]).
    pub tsc_khz: Option<u64>,
    /// TCG's translation cache, MiB (`tb-size`); `None`: QEMU's default.
    pub tb_mib: Option<u64>,
}

/// The guest kernel's command line.
fn cmdline(accel: &Accel, tsc_khz: Option<u64>) -> String {
    // panic=-1 with -no-reboot: a dead init powers the VM off instead of hanging it.
    // reboot=t: a guest reboot (`reboot` inside, openrc-init's stop) resets the CPU through a
    // triple fault, which stops the vCPU at once. The kernel's default, the ACPI reset
    // register followed by the keyboard controller, leaves the vCPU spinning on port I/O
    // after the reset request; under emulation that spin holds QEMU's big lock, so its main
    // loop took 5 to 25 s (5 reboots in 12) to act on the request and exit.
    // quiet and loglevel=3 keep the kernel's own lines out of `machine logs` but for the
    // critical ones (panics, file system errors); the rest stays in the guest's dmesg. Level
    // 3 rather than quiet's 4 because microvm has no PCI bus and the kernel reports that at
    // error level on every boot (`PCI: Fatal: No config space access function found`,
    // printed by pci_arch_init whatever pci= says, pci=off included). systemd.show_status=1
    // puts back what a user debugging a boot wants, systemd's status lines, which quiet
    // turns off too (OpenRC and busybox print theirs regardless).
    let mut line =
        String::from("console=ttyS0 panic=-1 reboot=t quiet loglevel=3 rw systemd.show_status=1");
    if !accel.kvm {
        // Under emulation on a busy host the kernel's calibration of the TSC against the
        // emulated PIT fails (the vCPU thread is descheduled between reads): the TSC is then
        // marked unstable and the guest spins, before its first console line, waiting for a
        // jiffy that never comes. A TCG guest's TSC is the host's, so its rate is given.
        line.push_str(" tsc=reliable no_timer_check");
        if let Some(khz) = tsc_khz {
            line.push_str(&format!(" tsc_early_khz={khz}"));
        }
    }
    line
}

#[async_trait]
impl Vmm for Qemu {
    fn program(&self) -> &Path {
        &self.binary
    }

    fn uses_kvm(&self) -> bool {
        self.accel.kvm
    }

    fn command(&self, a: Launch) -> Command {
        let mut c = Command::new(&self.binary);
        let mut fds = Fds::default();
        c.args([
            "-M",
            "microvm,rtc=on",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            // QEMU's seccomp filter: a VMM compromised by its guest may not gain privileges,
            // start programs, change resource limits or use obsolete system calls.
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        ]);
        if self.accel.kvm {
            c.args(["-accel", "kvm", "-cpu", "host"]);
        } else {
            let accel = match self.tb_mib {
                Some(mib) => format!("tcg,thread=multi,tb-size={mib}"),
                None => "tcg,thread=multi".into(),
            };
            c.arg("-accel").arg(accel).args(["-cpu", "max"]);
        }
        c.arg("-smp").arg(a.cpus.max(1).to_string());
        c.arg("-m").arg(format!("{}M", a.memory_mib));
        c.arg("-object").arg(format!(
            "memory-backend-memfd,id=mem,size={}M,share=on",
            a.memory_mib
        ));
        c.args(["-numa", "node,memdev=mem"]);
        // Appended to, so the service can drop the start of a flooded console in place.
        let console = fds.set(&mut c, vec![a.console]);
        c.arg("-chardev")
            .arg(format!("file,id=console,path={console},append=on"))
            .args(["-serial", "chardev:console"]);
        // QEMU opens `-kernel` by name only: the descriptor it inherited, reopened.
        let kernel = fds.pass(a.kernel);
        c.arg("-kernel").arg(format!("/proc/self/fd/{kernel}"));
        c.arg("-initrd").arg(&a.initrd);
        c.arg("-append").arg(cmdline(&self.accel, self.tsc_khz));
        // The disk's chain is given node by node, bottom first, each layer naming the one
        // below as its backing: QEMU opens no file named in a qcow2 header.
        let layers = a.disk.len();
        for (i, layer) in a.disk.into_iter().enumerate().rev() {
            let set = fds.set(&mut c, layer.files);
            let ro = if layer.read_only { ",read-only=on" } else { "" };
            let node = if i == 0 {
                "root".into()
            } else {
                format!("disk{i}")
            };
            c.arg("-blockdev").arg(format!(
                "driver=file,node-name={node}-file,filename={set}{ro},discard=unmap"
            ));
            let backing = match i + 1 < layers {
                true => format!(",backing=disk{}", i + 1),
                false if layer.format == super::vmm::DiskFormat::Qcow2 => ",backing=null".into(),
                false => String::new(),
            };
            c.arg("-blockdev").arg(format!(
                "driver={},node-name={node},file={node}-file{backing}{ro},discard=unmap",
                layer.format.name()
            ));
        }
        c.args(["-device", "virtio-blk-device,drive=root"]);
        c.arg("-chardev")
            .arg(format!("socket,id=vsock,path={}", a.vsock.display()));
        c.args(["-device", "vhost-user-vsock-device,chardev=vsock"]);
        for (i, (tag, sock)) in a.shares.into_iter().enumerate() {
            let fd = fds.pass(sock);
            c.arg("-chardev").arg(format!("socket,id=fs{i},fd={fd}"));
            c.arg("-device")
                .arg(format!("vhost-user-fs-device,chardev=fs{i},tag={tag}"));
        }
        c.args(["-device", "virtio-balloon-device,free-page-reporting=on"]);
        if let Some((net, tap)) = a.net {
            let fd = fds.pass(tap);
            c.arg("-netdev").arg(format!("tap,id=n0,fd={fd}"));
            c.arg("-device")
                .arg(format!("virtio-net-device,netdev=n0,mac={}", net.mac));
        }
        let control = fds.pass(a.control);
        c.arg("-chardev")
            .arg(format!("socket,id=qmp,fd={control},server=on,wait=off"))
            .args(["-mon", "chardev=qmp,mode=control"]);
        c.stdin(Stdio::null());
        super::sys::pass_fds(&mut c, fds.passed);
        c
    }

    async fn quit(&self, control: &Path) -> std::io::Result<()> {
        let control = control.to_path_buf();
        blocking(move || {
            let mut qmp = Qmp::connect(&control, Duration::from_secs(3))?;
            match qmp.execute("quit", json!({})) {
                // QEMU may close the socket as it exits.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(()),
                r => r.map(drop),
            }
        })
        .await
    }

    async fn switch_disk(&self, control: &Path, overlay: &Path) -> std::io::Result<()> {
        // QEMU (as the VM's user) cannot open the overlay: the service opens it and passes
        // it, read-write and read-only as at launch, then adds it as a node with no backing
        // and puts the node the VM writes to under it, without reopening that one.
        let rw = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(overlay)?;
        let ro = std::fs::File::open(overlay)?;
        let control = control.to_path_buf();
        blocking(move || {
            let mut qmp = Qmp::connect(&control, Duration::from_secs(30))?;
            let added = qmp.execute_with_fds("add-fd", json!({}), &[rw.as_fd()])?;
            let set = added
                .get("fdset-id")
                .and_then(serde_json::Value::as_u64)
                .ok_or_else(|| std::io::Error::other("QMP add-fd named no fd set"))?;
            qmp.execute_with_fds("add-fd", json!({ "fdset-id": set }), &[ro.as_fd()])?;
            let top = top_node(&qmp.execute("query-block", json!({}))?)
                .ok_or_else(|| std::io::Error::other("QMP query-block shows no disk"))?;
            let node = format!("overlay{set}");
            let switched = qmp
                .execute(
                    "blockdev-add",
                    json!({
                        "driver": "qcow2",
                        "node-name": node,
                        "discard": "unmap",
                        "backing": null,
                        // Unlocked: QEMU keeps the write lock of a node added here after
                        // a later switch puts it under another overlay, which would stop
                        // every clone that shares it from booting. The service alone hands
                        // out disks; it never gives this file to a second writer.
                        "file": {
                            "driver": "file",
                            "filename": format!("/dev/fdset/{set}"),
                            "discard": "unmap",
                            "locking": "off",
                        },
                    }),
                )
                .and_then(|_| {
                    qmp.execute("blockdev-snapshot", json!({ "node": top, "overlay": node }))
                        .inspect_err(|_| {
                            let _ = qmp.execute("blockdev-del", json!({ "node-name": node }));
                        })
                });
            if switched.is_err() {
                let _ = qmp.execute("remove-fd", json!({ "fdset-id": set }));
            }
            switched.map(drop)
        })
        .await
    }
}

/// The descriptors a QEMU command line hands over, numbered from 3 in order.
#[derive(Default)]
struct Fds {
    passed: Vec<(OwnedFd, RawFd)>,
    sets: u32,
}

impl Fds {
    /// The child's number for `fd`.
    fn pass(&mut self, fd: OwnedFd) -> RawFd {
        let n = 3 + self.passed.len() as RawFd;
        self.passed.push((fd, n));
        n
    }

    /// Adds the opens of one file to a new fd set (QEMU picks the one whose access mode it
    /// needs); the path QEMU opens it by.
    fn set(&mut self, c: &mut Command, files: Vec<OwnedFd>) -> String {
        self.sets += 1;
        for f in files {
            let fd = self.pass(f);
            c.arg("-add-fd").arg(format!("fd={fd},set={}", self.sets));
        }
        format!("/dev/fdset/{}", self.sets)
    }
}

/// The node the VM's disk device writes to, from QMP `query-block`.
fn top_node(blocks: &serde_json::Value) -> Option<String> {
    blocks.as_array()?.iter().find_map(|b| {
        b.get("inserted")?
            .get("node-name")?
            .as_str()
            .map(str::to_string)
    })
}

/// Runs a blocking QMP dialogue off the runtime's threads.
async fn blocking(f: impl FnOnce() -> std::io::Result<()> + Send + 'static) -> std::io::Result<()> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(std::io::Error::other)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_picks_tcg_on_nested_pvm_and_without_kvm() {
        let pvm = HostKvm {
            pvm: true,
            usable: true,
        };
        let none = HostKvm {
            pvm: false,
            usable: false,
        };
        let kvm = HostKvm {
            pvm: false,
            usable: true,
        };
        assert!(!choose_accel(Virtualization::Auto, pvm).kvm);
        assert!(
            choose_accel(Virtualization::Auto, pvm)
                .reason
                .contains("PVM")
        );
        assert!(!choose_accel(Virtualization::Auto, none).kvm);
        assert!(choose_accel(Virtualization::Auto, kvm).kvm);
        assert!(
            choose_accel(Virtualization::Kvm, none).kvm,
            "configured wins"
        );
        assert!(!choose_accel(Virtualization::Tcg, kvm).kvm);
    }

    fn args(qemu: &Qemu, net: Option<&super::super::vmm::NetDevice>) -> Vec<String> {
        use super::super::vmm::{DiskFormat, DiskLayer};
        let null = || OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        let launch = Launch {
            cpus: 2,
            memory_mib: 512,
            kernel: null(),
            initrd: "initrd.img".into(),
            disk: vec![
                DiskLayer {
                    format: DiskFormat::Qcow2,
                    files: vec![null(), null()],
                    read_only: false,
                },
                DiskLayer {
                    format: DiskFormat::Raw,
                    files: vec![null()],
                    read_only: true,
                },
            ],
            console: null(),
            control: null(),
            vsock: "vhu.sock".into(),
            shares: vec![("home".to_string(), null())],
            net: net.map(|n| (n.clone(), null())),
        };
        qemu.command(launch)
            .get_args()
            .map(|a| a.to_string_lossy().to_string())
            .collect()
    }

    #[test]
    fn the_command_line_wires_every_device() {
        let tcg = Qemu {
            binary: "qemu-system-x86_64".into(),
            accel: choose_accel(Virtualization::Tcg, HostKvm::probe()),
            tsc_khz: Some(2_445_406),
            tb_mib: None,
        };
        let a = args(&tcg, None).join(" ");
        for part in [
            "-M microvm,rtc=on",
            "-accel tcg,thread=multi -cpu max",
            "-smp 2 -m 512M",
            "memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem",
            // Descriptors from 3: the console, the kernel, then the disk's base, its top layer.
            "-add-fd fd=3,set=1 -chardev file,id=console,path=/dev/fdset/1,append=on -serial chardev:console",
            "-kernel /proc/self/fd/4 -initrd initrd.img",
            "-add-fd fd=5,set=2 -blockdev driver=file,node-name=disk1-file,filename=/dev/fdset/2,read-only=on,discard=unmap \
             -blockdev driver=raw,node-name=disk1,file=disk1-file,read-only=on,discard=unmap",
            "-add-fd fd=6,set=3 -add-fd fd=7,set=3 -blockdev driver=file,node-name=root-file,filename=/dev/fdset/3,discard=unmap \
             -blockdev driver=qcow2,node-name=root,file=root-file,backing=disk1,discard=unmap \
             -device virtio-blk-device,drive=root",
            "socket,id=vsock,path=vhu.sock -device vhost-user-vsock-device,chardev=vsock",
            "-chardev socket,id=fs0,fd=8 -device vhost-user-fs-device,chardev=fs0,tag=home",
            "virtio-balloon-device,free-page-reporting=on",
            "-chardev socket,id=qmp,fd=9,server=on,wait=off -mon chardev=qmp,mode=control",
            "tsc=reliable",
            "tsc_early_khz=2445406",
            "reboot=t",
            "loglevel=3",
            "systemd.show_status=1",
        ] {
            assert!(a.contains(part), "{part} missing from {a}");
        }
        assert!(!a.contains("-netdev"));
        let net = super::super::vmm::NetDevice {
            tap: "ctap-1".into(),
            mac: "52:54:00:01:02:03".into(),
        };
        let small = Qemu {
            tb_mib: Some(128),
            ..tcg.clone()
        };
        assert!(
            args(&small, None)
                .join(" ")
                .contains("-accel tcg,thread=multi,tb-size=128 -cpu max")
        );
        let kvm = Qemu {
            accel: choose_accel(Virtualization::Kvm, HostKvm::probe()),
            tb_mib: Some(128),
            ..tcg
        };
        let a = args(&kvm, Some(&net)).join(" ");
        assert!(a.contains("-accel kvm -cpu host"), "{a}");
        assert!(!a.contains("tsc=reliable") && !a.contains("tsc_early_khz"));
        assert!(a.contains(
            "-netdev tap,id=n0,fd=9 -device virtio-net-device,netdev=n0,mac=52:54:00:01:02:03"
        ));
        assert!(
            !a.contains("/d.qcow2") && !a.contains("ifname"),
            "no path but relative ones"
        );
    }
}
