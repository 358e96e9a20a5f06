//! QEMU's `microvm` as the [`Vmm`]: one `qemu-system-x86_64` per running machine, with guest
//! memory in a shared memfd (vhost-user devices map it), virtio-mmio devices (found by the
//! guest through ACPI): virtio-blk for the machine disk, vhost-user vsock and one vhost-user
//! fs per share, a balloon with free-page reporting (memory the guest frees goes back to the
//! host), an optional tap, the serial console to a file and a QMP socket. Acceleration is KVM
//! when it can run a standard guest kernel, TCG otherwise.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

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
    let mut line = String::from("console=ttyS0 panic=-1 reboot=t quiet loglevel=4 rw");
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

    fn command(&self, a: &Launch<'_>) -> Command {
        let mut c = Command::new(&self.binary);
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
        c.arg("-chardev")
            .arg(format!(
                "file,id=console,path={},append=on",
                a.console.display()
            ))
            .args(["-serial", "chardev:console"]);
        c.arg("-kernel").arg(a.kernel);
        c.arg("-initrd").arg(a.initrd);
        c.arg("-append").arg(cmdline(&self.accel, self.tsc_khz));
        c.arg("-drive").arg(format!(
            "id=root,file={},format=qcow2,if=none,cache=writeback,discard=unmap",
            a.disk.display()
        ));
        c.args(["-device", "virtio-blk-device,drive=root"]);
        c.arg("-chardev")
            .arg(format!("socket,id=vsock,path={}", a.vsock.display()));
        c.args(["-device", "vhost-user-vsock-device,chardev=vsock"]);
        for (i, (tag, sock)) in a.shares.iter().enumerate() {
            c.arg("-chardev")
                .arg(format!("socket,id=fs{i},path={}", sock.display()));
            c.arg("-device")
                .arg(format!("vhost-user-fs-device,chardev=fs{i},tag={tag}"));
        }
        c.args(["-device", "virtio-balloon-device,free-page-reporting=on"]);
        if let Some(net) = a.net {
            c.arg("-netdev").arg(format!(
                "tap,id=n0,ifname={},script=no,downscript=no",
                net.tap
            ));
            c.arg("-device")
                .arg(format!("virtio-net-device,netdev=n0,mac={}", net.mac));
        }
        c.arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", a.control.display()));
        c.stdin(Stdio::null());
        c
    }

    async fn quit(&self, control: &Path) -> std::io::Result<()> {
        tokio::time::timeout(Duration::from_secs(3), qmp_quit(control))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "QMP did not answer"))?
    }
}

type QmpLines = tokio::io::Lines<tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>>;

/// Reads QMP lines (events may come first) until the command's answer.
async fn qmp_answer(lines: &mut QmpLines) -> std::io::Result<()> {
    while let Some(line) = lines.next_line().await? {
        if line.contains("\"return\"") {
            return Ok(());
        }
        if line.contains("\"error\"") {
            return Err(std::io::Error::other(line));
        }
    }
    // QEMU may close the socket as it exits on `quit`.
    Ok(())
}

/// The QMP dialogue: greeting, capabilities negotiation, `quit`.
async fn qmp_quit(control: &Path) -> std::io::Result<()> {
    let stream = tokio::net::UnixStream::connect(control).await?;
    let (r, mut w) = stream.into_split();
    let mut lines = tokio::io::BufReader::new(r).lines();
    lines.next_line().await?;
    w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n").await?;
    qmp_answer(&mut lines).await?;
    w.write_all(b"{\"execute\":\"quit\"}\n").await?;
    qmp_answer(&mut lines).await
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
        let p = Path::new;
        let shares = [("home".to_string(), PathBuf::from("/r/fs/home.sock"))];
        let launch = Launch {
            cpus: 2,
            memory_mib: 512,
            kernel: p("/k"),
            initrd: p("/i"),
            disk: p("/d.qcow2"),
            console: p("/m/console.log"),
            control: p("/r/qmp.sock"),
            vsock: p("/r/vhu.sock"),
            shares: &shares,
            net,
        };
        qemu.command(&launch)
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
            "-chardev file,id=console,path=/m/console.log,append=on -serial chardev:console",
            "file=/d.qcow2,format=qcow2",
            "socket,id=vsock,path=/r/vhu.sock -device vhost-user-vsock-device,chardev=vsock",
            "socket,id=fs0,path=/r/fs/home.sock -device vhost-user-fs-device,chardev=fs0,tag=home",
            "virtio-balloon-device,free-page-reporting=on",
            "-qmp unix:/r/qmp.sock,server=on,wait=off",
            "tsc=reliable",
            "tsc_early_khz=2445406",
            "reboot=t",
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
            "-netdev tap,id=n0,ifname=ctap-1,script=no,downscript=no -device virtio-net-device,netdev=n0,mac=52:54:00:01:02:03"
        ));
    }
}
