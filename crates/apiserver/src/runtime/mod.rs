//! The VM runtime: machine disks, the kernel and initramfs, the QEMU microvm runner with its
//! helper processes, and their supervision.
//!
//! Each running machine has a `run.json` in its machine directory (QEMU's and the helpers'
//! pids with their start times, the runtime directory). QEMU runs in its own process group,
//! so the service can stop and start while machines run: at start, `Runtime::new` adopts
//! every machine whose QEMU still runs and cleans up after the others. Whenever QEMU exits,
//! for whatever reason, its helpers are killed and its runtime files removed.

pub mod disk;
pub mod initramfs;
pub mod kernel;
pub mod qemu;
mod session;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use container_agent_proto as proto;
use container_api::machine::{HomeMount, MachineState};
use container_api::system::KernelInfo;
use container_api::{ApiError, ErrorKind};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncRead;

use crate::config::Config;
use crate::core::ServiceOptions;
use crate::core::ports::{BootSpec, ClientStream, ExecSpec, Vms};
use crate::fsutil;

/// What is recorded about a running VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RunState {
    qemu: (i32, u64),
    helpers: Vec<(i32, u64)>,
    run_dir: PathBuf,
    started: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug)]
struct Vm {
    state: Mutex<MachineState>,
    run: RunState,
    machine_dir: PathBuf,
}

impl Vm {
    fn vsock(&self) -> PathBuf {
        self.run.run_dir.join("vsock.sock")
    }
    fn set(&self, s: MachineState) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = s;
    }
    fn get(&self) -> MachineState {
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The runtime behind the core's `Vms` port.
#[derive(Debug)]
pub struct Runtime {
    root: PathBuf,
    run_dir: PathBuf,
    config: Config,
    accel: qemu::Accel,
    vms: Mutex<HashMap<String, Arc<Vm>>>,
    /// Supervision tasks need an owning handle; the trait's methods get `&self`.
    me: std::sync::Weak<Runtime>,
}

/// How long a boot may take before it is called failed (software emulation is slow).
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a guest may stay silent on its console before the boot is retried.
const SILENCE_LIMIT: Duration = Duration::from_secs(20);

/// Why one boot attempt failed.
enum BootError {
    /// Nothing on the console: worth another try.
    Silent,
    Failed(ApiError),
}

impl From<ApiError> for BootError {
    fn from(e: ApiError) -> Self {
        BootError::Failed(e)
    }
}

/// The runtime of a running service, with running machines adopted.
pub fn vms(options: &ServiceOptions, config: &Config) -> anyhow::Result<Arc<dyn Vms>> {
    let rt = Arc::new_cyclic(|me| Runtime {
        root: options.root.clone(),
        run_dir: options.run_dir.clone(),
        config: config.clone(),
        accel: qemu::detect_accel(config.runtime.virtualization),
        vms: Mutex::new(HashMap::new()),
        me: me.clone(),
    });
    rt.adopt_all();
    Ok(rt)
}

impl Runtime {
    fn self_arc(&self) -> Result<Arc<Runtime>, ApiError> {
        self.me
            .upgrade()
            .ok_or_else(|| ApiError::internal("the runtime is shutting down"))
    }

    fn machine_dir(&self, name: &str) -> PathBuf {
        self.root.join("machines").join(name)
    }

    /// The accelerator and the reason it was chosen.
    pub fn accel(&self) -> &qemu::Accel {
        &self.accel
    }

    fn get(&self, name: &str) -> Option<Arc<Vm>> {
        self.vms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// Adopts running machines and cleans up after dead ones.
    fn adopt_all(self: &Arc<Self>) {
        let Ok(entries) = std::fs::read_dir(self.root.join("machines")) else {
            return;
        };
        for e in entries.flatten() {
            let dir = e.path();
            let run_file = dir.join("run.json");
            let Ok(Some(run)) = fsutil::read_json::<RunState>(&run_file) else {
                continue;
            };
            let name = e.file_name().to_string_lossy().to_string();
            if qemu::alive(run.qemu.0, run.qemu.1) {
                tracing::info!(machine = %name, pid = run.qemu.0, "re-adopting a running machine");
                let vm = Arc::new(Vm {
                    state: Mutex::new(MachineState::Running),
                    run,
                    machine_dir: dir,
                });
                self.vms
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(name.clone(), vm.clone());
                self.watch(name, vm, None);
            } else {
                tracing::info!(machine = %name, "cleaning up after a machine that stopped while the service was down");
                cleanup(&run, &dir);
            }
        }
    }

    /// Waits for QEMU to exit (as its parent, or by polling an adopted one), then cleans up.
    fn watch(self: &Arc<Self>, name: String, vm: Arc<Vm>, child: Option<std::process::Child>) {
        let rt = self.clone();
        tokio::task::spawn_blocking(move || {
            match child {
                Some(mut c) => {
                    let _ = c.wait();
                }
                None => {
                    while qemu::alive(vm.run.qemu.0, vm.run.qemu.1) {
                        std::thread::sleep(Duration::from_millis(250));
                    }
                }
            }
            cleanup(&vm.run, &vm.machine_dir);
            vm.set(MachineState::Stopped);
            let mut vms = rt.vms.lock().unwrap_or_else(|p| p.into_inner());
            if vms.get(&name).is_some_and(|v| Arc::ptr_eq(v, &vm)) {
                vms.remove(&name);
            }
            tracing::info!(machine = %name, "machine stopped");
        });
    }

    fn kernel_for(
        &self,
        custom: Option<&str>,
    ) -> Result<(PathBuf, String, Option<PathBuf>), ApiError> {
        let installed = kernel::current(&self.root);
        let override_ = &self.config.kernel;
        let (binary, modules) = match (custom, &override_.binary) {
            (Some(k), _) => (
                PathBuf::from(k),
                installed
                    .as_ref()
                    .and_then(|i| i.modules.clone())
                    .map(PathBuf::from),
            ),
            (None, Some(b)) => (
                PathBuf::from(b),
                override_.modules.clone().map(PathBuf::from),
            ),
            (None, None) => match &installed {
                Some(i) => (PathBuf::from(&i.path), i.modules.clone().map(PathBuf::from)),
                None => {
                    return Err(ApiError::new(
                        ErrorKind::Unavailable,
                        "no kernel is installed; run `container system kernel set --recommended` (as root)",
                    ));
                }
            },
        };
        let digest = format!(
            "{}:{}",
            binary.display(),
            std::fs::metadata(&binary).map(|m| m.len()).unwrap_or(0)
        );
        Ok((binary, digest, modules))
    }

    /// Boots, retrying once when the guest stays silent: under software emulation a guest
    /// kernel occasionally stalls before its first console line (cause not yet found); a
    /// fresh start gets past it.
    async fn boot_inner(self: &Arc<Self>, spec: BootSpec) -> Result<(), ApiError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.boot_once(spec.clone(), attempt < 3).await {
                Err(BootError::Silent) => {
                    tracing::warn!(machine = %spec.record.name, attempt, "the guest printed nothing; restarting the VM");
                }
                Err(BootError::Failed(e)) => return Err(e),
                Ok(()) => return Ok(()),
            }
        }
    }

    async fn boot_once(self: &Arc<Self>, spec: BootSpec, may_retry: bool) -> Result<(), BootError> {
        let name = spec.record.name.clone();
        let (kernel, kernel_key, modules) = self.kernel_for(spec.record.kernel.as_deref())?;
        let agent = qemu::find_binary("container-agent", self.config.runtime.agent.as_deref())?;
        let qemu_bin =
            qemu::find_binary("qemu-system-x86_64", self.config.runtime.qemu.as_deref())?;
        let vsock_bin = qemu::find_binary(
            "vhost-device-vsock",
            self.config.runtime.vhost_device_vsock.as_deref(),
        )?;
        let fs_bin = if spec.shares.is_empty() {
            None
        } else {
            Some(qemu::find_binary(
                "virtiofsd",
                self.config.runtime.virtiofsd.as_deref(),
            )?)
        };
        let rt = self.clone();
        let machine_dir = spec.machine_dir.clone();
        let (vm, child) = tokio::task::spawn_blocking(move || -> Result<_, ApiError> {
            let initrd = initramfs::build(
                &rt.root.join("initramfs"),
                &kernel_key,
                modules.as_deref(),
                &agent,
            )?;
            let short = hex::encode(&<sha2::Sha256 as sha2::Digest>::digest(name.as_bytes())[..6]);
            let run_dir = rt.run_dir.join("vm").join(short);
            let _ = std::fs::remove_dir_all(&run_dir);
            std::fs::create_dir_all(&run_dir)
                .map_err(|e| ApiError::internal(format!("creating {}: {e}", run_dir.display())))?;
            let user = &spec.record.user;
            let boot = proto::BootConfig {
                version: proto::VERSION,
                machine_id: spec.record.name.clone(),
                hostname: spec.record.name.clone(),
                root_device: "/dev/vda".into(),
                grow_root: true,
                modules: initrd.modules.clone(),
                shares: spec
                    .shares
                    .iter()
                    .map(|s| proto::Share {
                        tag: s.tag.clone(),
                        guest_path: s.guest_path.clone(),
                        read_only: s.read_only,
                    })
                    .collect(),
                user: Some(proto::UserSpec {
                    name: user.name.clone(),
                    uid: user.uid,
                    gid: user.gid,
                    home: user.home.clone(),
                    shell: user.shell.clone(),
                }),
                home_mount: match spec.record.home_mount {
                    HomeMount::Rw => proto::HomeMount::Rw,
                    HomeMount::Ro => proto::HomeMount::Ro,
                    HomeMount::None => proto::HomeMount::None,
                },
                network: None,
                vsock_port: proto::PORT,
                time_unix_ns: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0),
                init: vec!["/sbin/init".into()],
            };
            let initrd_path = run_dir.join("initrd.img");
            initramfs::with_boot_config(
                &initrd.path,
                &serde_json::to_vec(&boot).expect("boot config serialises"),
                &initrd_path,
            )?;
            let log = std::fs::File::create(machine_dir.join("helpers.log"))
                .map_err(|e| ApiError::internal(format!("creating the helper log: {e}")))?;
            let mut helpers: Vec<(i32, u64)> = Vec::new();
            let mut children = Vec::new();
            let spawn = |mut c: std::process::Command,
                         what: &str|
             -> Result<std::process::Child, ApiError> {
                use std::os::unix::process::CommandExt;
                c.process_group(0)
                    .stdin(std::process::Stdio::null())
                    .stdout(
                        log.try_clone()
                            .map_err(|e| ApiError::internal(e.to_string()))?,
                    )
                    .stderr(
                        log.try_clone()
                            .map_err(|e| ApiError::internal(e.to_string()))?,
                    );
                c.spawn()
                    .map_err(|e| ApiError::internal(format!("starting {what}: {e}")))
            };
            // vsock
            let vhu = run_dir.join("vhu.sock");
            let vsock_uds = run_dir.join("vsock.sock");
            let mut c = std::process::Command::new(&vsock_bin);
            c.arg("--guest-cid")
                .arg("3")
                .arg("--socket")
                .arg(&vhu)
                .arg("--uds-path")
                .arg(&vsock_uds);
            let mut child = spawn(c, "vhost-device-vsock")?;
            let pid = child.id() as i32;
            helpers.push((pid, qemu::start_ticks(pid).unwrap_or(0)));
            let waited = qemu::wait_for_socket(&vhu, &mut child, "vhost-device-vsock");
            children.push(child);
            let fail = |e: ApiError, helpers: &[(i32, u64)]| {
                for (p, t) in helpers {
                    qemu::kill(*p, *t);
                }
                let _ = std::fs::remove_dir_all(&run_dir);
                e
            };
            if let Err(e) = waited {
                return Err(fail(e, &helpers));
            }
            // virtio-fs shares, each served as the machine's owner
            let fs_dir = run_dir.join("fs");
            let mut shares = Vec::new();
            if let Some(fs_bin) = &fs_bin {
                std::fs::create_dir_all(&fs_dir)
                    .map_err(|e| fail(ApiError::internal(e.to_string()), &helpers))?;
                let _ =
                    std::os::unix::fs::chown(&fs_dir, Some(spec.record.owner_uid), Some(user.gid));
                for s in &spec.shares {
                    let sock = fs_dir.join(format!("{}.sock", s.tag));
                    let mut c = std::process::Command::new(fs_bin);
                    c.arg("--socket-path")
                        .arg(&sock)
                        .arg("--shared-dir")
                        .arg(&s.host_path)
                        .args(["--sandbox", "none", "--cache", "auto"]);
                    if s.read_only {
                        c.arg("--readonly");
                    }
                    if spec.record.owner_uid != 0 {
                        use std::os::unix::process::CommandExt;
                        c.uid(spec.record.owner_uid).gid(user.gid);
                    }
                    let mut child = match spawn(c, "virtiofsd") {
                        Ok(c) => c,
                        Err(e) => return Err(fail(e, &helpers)),
                    };
                    let pid = child.id() as i32;
                    helpers.push((pid, qemu::start_ticks(pid).unwrap_or(0)));
                    if let Err(e) = qemu::wait_for_socket(&sock, &mut child, "virtiofsd") {
                        return Err(fail(e, &helpers));
                    }
                    children.push(child);
                    shares.push((s.tag.clone(), sock));
                }
            }
            let console = machine_dir.join("console.log");
            let qmp = run_dir.join("qmp.sock");
            let args = qemu::QemuArgs {
                accel: &rt.accel,
                cpus: spec.record.cpus,
                memory_mib: spec.record.memory >> 20,
                kernel: &kernel,
                initrd: &initrd_path,
                disk: &spec.disk,
                console: &console,
                qmp: &qmp,
                vsock_socket: &vhu,
                shares,
                tap: None,
            };
            let child = match spawn(qemu::command(&qemu_bin, &args), "qemu-system-x86_64") {
                Ok(c) => c,
                Err(e) => return Err(fail(e, &helpers)),
            };
            // The helpers are reaped by their own threads; they die with QEMU's cleanup.
            for mut h in children {
                std::thread::spawn(move || {
                    let _ = h.wait();
                });
            }
            let pid = child.id() as i32;
            let run = RunState {
                qemu: (pid, qemu::start_ticks(pid).unwrap_or(0)),
                helpers,
                run_dir,
                started: chrono::Utc::now(),
            };
            fsutil::write_json(&machine_dir.join("run.json"), &run)
                .map_err(|e| ApiError::internal(format!("recording the running machine: {e}")))?;
            Ok((
                Arc::new(Vm {
                    state: Mutex::new(MachineState::Starting),
                    run,
                    machine_dir: machine_dir.clone(),
                }),
                child,
            ))
        })
        .await
        .map_err(|e| ApiError::internal(format!("boot task failed: {e}")))??;
        let name = spec_name(&vm);
        let launched = Instant::now();
        let console = vm.machine_dir.join("console.log");
        self.vms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.clone(), vm.clone());
        self.watch(name.clone(), vm.clone(), Some(child));
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            if vm.get() == MachineState::Stopped {
                return Err(BootError::Failed(ApiError::new(
                    ErrorKind::Unavailable,
                    format!(
                        "the VM exited during boot; last lines of its console:\n{}",
                        qemu::tail(&vm.machine_dir.join("console.log"), 15)
                    ),
                )));
            }
            if may_retry
                && launched.elapsed() > SILENCE_LIMIT
                && std::fs::metadata(&console).map(|m| m.len()).unwrap_or(0) == 0
            {
                let _ = self.force_stop(&vm).await;
                return Err(BootError::Silent);
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            let attempt = Instant::now() + remaining.min(Duration::from_secs(2));
            match proto::host::wait_ready(&vm.vsock(), proto::PORT, attempt).await {
                Ok(_) => break,
                Err(e) if Instant::now() >= deadline => {
                    let _ = self.force_stop(&vm).await;
                    return Err(BootError::Failed(ApiError::new(
                        ErrorKind::Unavailable,
                        format!(
                            "the guest agent did not answer within {} s ({e}); last lines of the console:\n{}",
                            BOOT_TIMEOUT.as_secs(),
                            qemu::tail(&vm.machine_dir.join("console.log"), 15)
                        ),
                    )));
                }
                Err(_) => {}
            }
        }
        vm.set(MachineState::Running);
        Ok(())
    }

    async fn force_stop(&self, vm: &Arc<Vm>) -> Result<(), ApiError> {
        qemu::kill(vm.run.qemu.0, vm.run.qemu.1);
        self.wait_stopped(vm, Duration::from_secs(10)).await
    }

    async fn wait_stopped(&self, vm: &Arc<Vm>, limit: Duration) -> Result<(), ApiError> {
        let deadline = Instant::now() + limit;
        while vm.get() != MachineState::Stopped {
            if Instant::now() > deadline {
                return Err(ApiError::internal("the VM did not exit"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    fn running(&self, name: &str) -> Result<Arc<Vm>, ApiError> {
        self.get(name)
            .filter(|v| v.get() == MachineState::Running)
            .ok_or_else(|| ApiError::conflict(format!("machine `{name}` is not running")))
    }
}

fn spec_name(vm: &Vm) -> String {
    vm.machine_dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default()
}

/// Kills what is left of a VM and removes its runtime files.
fn cleanup(run: &RunState, machine_dir: &Path) {
    qemu::kill(run.qemu.0, run.qemu.1);
    for (pid, ticks) in &run.helpers {
        qemu::kill(*pid, *ticks);
    }
    let _ = std::fs::remove_dir_all(&run.run_dir);
    let _ = std::fs::remove_file(machine_dir.join("run.json"));
}

/// Status details for `system status`.
pub fn kernel_info(root: &Path) -> Option<KernelInfo> {
    kernel::current(root)
}

#[async_trait]
impl Vms for Runtime {
    async fn create_disk(&self, base: &Path, disk: &Path, size: u64) -> Result<(), ApiError> {
        let (base, disk) = (base.to_path_buf(), disk.to_path_buf());
        tokio::task::spawn_blocking(move || disk::create_overlay(&base, &disk, size))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?
    }
    async fn grow_disk(&self, disk: &Path, size: u64) -> Result<(), ApiError> {
        let disk = disk.to_path_buf();
        tokio::task::spawn_blocking(move || disk::grow(&disk, size))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?
    }
    fn disk_allocated(&self, disk: &Path) -> u64 {
        disk::allocated(disk)
    }
    async fn boot(&self, spec: BootSpec) -> Result<(), ApiError> {
        // The trait takes &self; supervision needs an Arc, which the service holds.
        let this = self.self_arc()?;
        this.boot_inner(spec).await
    }
    async fn shutdown(
        &self,
        name: &str,
        signal: Option<i32>,
        timeout: Duration,
    ) -> Result<(), ApiError> {
        let Some(vm) = self.get(name) else {
            return Ok(());
        };
        vm.set(MachineState::Stopping);
        let asked = tokio::time::timeout(
            Duration::from_secs(5),
            proto::host::call(
                &vm.vsock(),
                proto::PORT,
                proto::Message::Shutdown {
                    signal,
                    timeout_ms: timeout.as_millis() as u64,
                },
            ),
        )
        .await;
        if !matches!(asked, Ok(Ok(_))) {
            tracing::warn!(machine = %name, "the guest agent did not take the stop request; forcing the VM off");
            return self.force_stop(&vm).await;
        }
        match self
            .wait_stopped(&vm, timeout + Duration::from_secs(5))
            .await
        {
            Ok(()) => Ok(()),
            Err(_) => self.force_stop(&vm).await,
        }
    }
    fn state(&self, name: &str) -> MachineState {
        self.get(name)
            .map(|v| v.get())
            .unwrap_or(MachineState::Stopped)
    }
    fn started(&self, name: &str) -> Option<chrono::DateTime<chrono::Utc>> {
        self.get(name).map(|v| v.run.started)
    }
    async fn exec(
        &self,
        name: &str,
        spec: ExecSpec,
        client: Box<dyn ClientStream>,
    ) -> Result<(), ApiError> {
        let vm = self.running(name)?;
        session::exec(&vm.vsock(), spec, client).await
    }
    async fn copy_in(
        &self,
        name: &str,
        path: &str,
        tar: Box<dyn AsyncRead + Send + Unpin>,
    ) -> Result<(), ApiError> {
        let vm = self.running(name)?;
        session::copy_in(&vm.vsock(), path, tar).await
    }
    async fn copy_out(
        &self,
        name: &str,
        path: &str,
    ) -> Result<Box<dyn AsyncRead + Send + Unpin>, ApiError> {
        let vm = self.running(name)?;
        session::copy_out(&vm.vsock(), path).await
    }
    fn log_path(&self, name: &str, _boot: bool) -> PathBuf {
        self.machine_dir(name).join("console.log")
    }
}
