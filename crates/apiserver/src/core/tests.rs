//! Unit tests of the core through its one door, with fakes for every port: no image store,
//! no VM, no network and no host passwd database are touched.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use container_api::machine::{CreateRequest, MachineState, StopRequest};
use container_api::{ApiError, ErrorKind};
use tokio::io::AsyncRead;

use container_api::image::{ImageDetail, ImageSummary, LoginRequest, PullEvent, RemoveReport};
use container_api::machine::MachineUser;
use container_api::system::{KernelInfo, KernelSetRequest};

use super::ports::{
    BootSpec, Bytes, ClientStream, ExecSpec, Host, ImageInfo, Images, InUse, Namespace, Net,
    NetLease, Platform, Reboot, Vms,
};
use super::*;
use crate::config::{HostFacts, load};

/// The image store, recording which namespace each call acts in. `busybox`, `debian` and
/// `noinit` are system-wide images every caller sees; `private` is a name of root's own.
#[derive(Default)]
struct FakeImages {
    calls: Mutex<Vec<String>>,
    /// What `list` answers from: each namespace sees its own names and the system-wide ones.
    listed: Mutex<Vec<ImageSummary>>,
}

impl FakeImages {
    fn record(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }

    fn calls(&self) -> Vec<String> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }

    /// The names `ns` sees: its own and the system-wide ones.
    fn seen(&self, ns: Namespace) -> Vec<ImageSummary> {
        let mine = |i: &&ImageSummary| match ns {
            Namespace::User(uid) => i.owner.is_none() || i.owner == Some(uid),
            Namespace::System => i.owner.is_none(),
        };
        let listed = self.listed.lock().unwrap();
        listed.iter().filter(mine).cloned().collect()
    }
}

fn summary_of(reference: &str, ns: Namespace) -> ImageSummary {
    ImageSummary {
        reference: reference.into(),
        digest: format!("sha256:{reference}"),
        size: 0,
        created: None,
        has_init: Some(true),
        owner: match ns {
            Namespace::User(uid) => Some(uid),
            Namespace::System => None,
        },
    }
}

/// What the machine core does not use of the image store.
fn unused<T>() -> Result<T, ApiError> {
    Err(ApiError::internal("not used by these tests"))
}

#[async_trait]
impl Images for FakeImages {
    async fn list(&self, ns: Namespace) -> Result<Vec<ImageSummary>, ApiError> {
        self.record(format!("list {ns:?}"));
        Ok(self.seen(ns))
    }
    async fn list_all(&self) -> Result<Vec<ImageSummary>, ApiError> {
        self.record("list_all".into());
        Ok(Vec::new())
    }
    async fn inspect(&self, _: Namespace, _: &str) -> Result<ImageDetail, ApiError> {
        unused()
    }
    async fn tag(
        &self,
        ns: Namespace,
        source: &str,
        target: &str,
    ) -> Result<ImageSummary, ApiError> {
        self.record(format!("tag {ns:?} {source} {target}"));
        Ok(summary_of(target, ns))
    }
    async fn pull(
        &self,
        uid: u32,
        ns: Namespace,
        reference: &str,
        _: tokio::sync::mpsc::Sender<PullEvent>,
    ) -> Result<ImageSummary, ApiError> {
        self.record(format!("pull {ns:?} {reference} as {uid}"));
        Ok(summary_of(reference, ns))
    }
    async fn push(
        &self,
        uid: u32,
        ns: Namespace,
        reference: &str,
        _: tokio::sync::mpsc::Sender<PullEvent>,
    ) -> Result<ImageSummary, ApiError> {
        self.record(format!("push {ns:?} {reference} as {uid}"));
        Ok(summary_of(reference, ns))
    }
    async fn load(&self, ns: Namespace, mut archive: Bytes) -> Result<Vec<ImageSummary>, ApiError> {
        // Spooled whole, as the real store does.
        let size = tokio::io::copy(&mut archive, &mut tokio::io::sink())
            .await
            .map_err(|e| ApiError::invalid(format!("reading the archive: {e}")))?;
        self.record(format!("load {ns:?} {size}"));
        Ok(Vec::new())
    }
    async fn commit(
        &self,
        ns: Namespace,
        commit: super::ports::Commit,
        mut tar: Bytes,
    ) -> Result<ImageSummary, ApiError> {
        let size = tokio::io::copy(&mut tar, &mut tokio::io::sink())
            .await
            .map_err(|e| ApiError::invalid(format!("reading the tar: {e}")))?;
        self.record(format!(
            "commit {ns:?} {} from {} {:?} {size}",
            commit.reference, commit.base, commit.labels
        ));
        Ok(summary_of(&commit.reference, ns))
    }
    async fn save(&self, ns: Namespace, references: Vec<String>) -> Result<Bytes, ApiError> {
        self.record(format!("save {ns:?} {references:?}"));
        Ok(Box::new(tokio::io::empty()))
    }
    async fn remove(
        &self,
        ns: Namespace,
        reference: &str,
        in_use: InUse,
        _: bool,
    ) -> Result<RemoveReport, ApiError> {
        self.record(format!("remove {ns:?} {reference} {in_use:?}"));
        Ok(RemoveReport {
            untagged: vec![reference.into()],
            deleted: Vec::new(),
            freed_bytes: 0,
        })
    }
    async fn usage(
        &self,
        ns: Namespace,
        untag: Vec<String>,
        _: InUse,
    ) -> Result<super::ports::ImageUsage, ApiError> {
        self.record(format!("usage {ns:?} {untag:?}"));
        // A megabyte a name seen, a kilobyte a name untagged: what the core adds up shows.
        let seen = self.seen(ns).len() as u64;
        Ok(super::ports::ImageUsage {
            bytes: seen << 20,
            reclaimable: (untag.len() as u64) << 10,
        })
    }
    async fn login(&self, _: u32, _: LoginRequest) -> Result<(), ApiError> {
        unused()
    }
    async fn logout(&self, _: u32, _: &str) -> Result<bool, ApiError> {
        unused()
    }
    async fn prepare(&self, ns: Namespace, reference: &str) -> Result<ImageInfo, ApiError> {
        // A real store reads and perhaps pulls: other requests run meanwhile.
        tokio::task::yield_now().await;
        let info = |has_init, stop_signal: Option<&str>| ImageInfo {
            reference: reference.into(),
            digest: format!("sha256:{reference}"),
            has_init,
            stop_signal: stop_signal.map(Into::into),
            base_disk: PathBuf::from("/base.ext4"),
            hold: Default::default(),
        };
        match (reference, ns) {
            ("busybox", _) => Ok(info(true, None)),
            ("debian", _) => Ok(info(true, Some("SIGRTMIN+3"))),
            ("noinit", _) => Ok(info(false, None)),
            ("private", Namespace::User(0)) => Ok(info(true, None)),
            (other, _) => Err(ApiError::not_found(format!("image {other} not found"))),
        }
    }
}

struct FakeVms {
    running: Mutex<HashMap<String, BootSpec>>,
    /// Stats samples taken, per machine.
    samples: Mutex<HashMap<String, u64>>,
    calls: Mutex<Vec<String>>,
    reboots: tokio::sync::broadcast::Sender<Reboot>,
}

impl Default for FakeVms {
    fn default() -> Self {
        FakeVms {
            running: Default::default(),
            samples: Default::default(),
            calls: Default::default(),
            reboots: tokio::sync::broadcast::channel(16).0,
        }
    }
}

impl FakeVms {
    /// The guest of a running machine rebooted, as the runtime reports it.
    fn guest_reboots(&self, name: &str) {
        let at = self.guest_goes_down(name);
        self.report_reboot(name, at);
    }

    /// The VM of a running machine ends; when.
    fn guest_goes_down(&self, name: &str) -> std::time::Instant {
        self.running.lock().unwrap().remove(name);
        std::time::Instant::now()
    }

    /// The runtime reports that the VM that ended `at` did so by a reboot.
    fn report_reboot(&self, name: &str, at: std::time::Instant) {
        let name = name.to_string();
        self.reboots.send(Reboot { name, at }).unwrap();
    }

    fn boots(&self, name: &str) -> usize {
        let calls = self.calls.lock().unwrap();
        calls
            .iter()
            .filter(|c| **c == format!("boot {name}"))
            .count()
    }

    /// Waits until the machine runs (the reboot follower works in the background).
    async fn until_running(&self, name: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.state(name) != MachineState::Running {
            assert!(std::time::Instant::now() < deadline, "{name} never ran");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

#[async_trait]
impl Vms for FakeVms {
    async fn create_disk(&self, _base: &Path, disk: &Path, size: u64) -> Result<(), ApiError> {
        std::fs::write(disk, b"qcow").unwrap();
        self.calls
            .lock()
            .unwrap()
            .push(format!("create_disk {size}"));
        Ok(())
    }
    async fn grow_disk(&self, _disk: &Path, size: u64) -> Result<(), ApiError> {
        self.calls.lock().unwrap().push(format!("grow_disk {size}"));
        Ok(())
    }
    fn disk_allocated(&self, _disk: &Path) -> u64 {
        4096
    }
    async fn freeze_disk(&self, name: &str, disk: &Path) -> Result<PathBuf, ApiError> {
        // A layer beside the disk holding what the disk holds (the fakes' disks are files).
        let layer = disk.with_extension(format!("layer-{}", self.calls.lock().unwrap().len()));
        std::fs::copy(disk, &layer).unwrap();
        self.calls
            .lock()
            .unwrap()
            .push(format!("freeze_disk {name}"));
        Ok(layer)
    }
    async fn disk_from_layer(&self, layer: &Path, disk: &Path) -> Result<(), ApiError> {
        std::fs::copy(layer, disk).unwrap();
        self.calls.lock().unwrap().push("disk_from_layer".into());
        Ok(())
    }
    async fn collect_layers(&self, _roots: Vec<PathBuf>) -> Result<(), ApiError> {
        Ok(())
    }
    async fn boot(&self, spec: BootSpec) -> Result<(), ApiError> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("boot {}", spec.record.name));
        // A real VM is up only after a while: other requests run meanwhile.
        tokio::task::yield_now().await;
        self.running
            .lock()
            .unwrap()
            .insert(spec.record.name.clone(), spec);
        Ok(())
    }
    async fn shutdown(
        &self,
        name: &str,
        signal: Option<i32>,
        _t: Duration,
    ) -> Result<(), ApiError> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("shutdown {name} {signal:?}"));
        self.running.lock().unwrap().remove(name);
        Ok(())
    }
    fn state(&self, name: &str) -> MachineState {
        if self.running.lock().unwrap().contains_key(name) {
            MachineState::Running
        } else {
            MachineState::Stopped
        }
    }
    fn started(&self, _name: &str) -> Option<chrono::DateTime<chrono::Utc>> {
        None
    }
    async fn exec(&self, _: &str, _: ExecSpec, _: Box<dyn ClientStream>) -> Result<(), ApiError> {
        Ok(())
    }
    async fn copy_in(
        &self,
        _: &str,
        _: &str,
        _: Box<dyn AsyncRead + Send + Unpin>,
    ) -> Result<(), ApiError> {
        Ok(())
    }
    async fn copy_out(
        &self,
        _: &str,
        _: &str,
    ) -> Result<Box<dyn AsyncRead + Send + Unpin>, ApiError> {
        Ok(Box::new(&b""[..]))
    }
    async fn copy_root(&self, _: &str) -> Result<Box<dyn AsyncRead + Send + Unpin>, ApiError> {
        Ok(Box::new(&b"root"[..]))
    }
    fn log_path(&self, name: &str, _boot: bool) -> PathBuf {
        PathBuf::from(format!("/logs/{name}"))
    }
    /// A running VM's first sample has no CPU rate; later ones have 12.5 %.
    async fn stats(&self, name: &str) -> Option<super::ports::VmStats> {
        if !self.running.lock().unwrap().contains_key(name) {
            return None;
        }
        let mut samples = self.samples.lock().unwrap();
        let n = samples.entry(name.to_string()).or_default();
        *n += 1;
        Some(super::ports::VmStats {
            cpu_time_ns: *n * 1000,
            cpu_percent: (*n > 1).then_some(12.5),
            host_memory: container_api::stats::HostMemory {
                rss: 300 << 20,
                pss: 200 << 20,
                processes: vec![],
            },
            guest_memory: None,
            network: None,
        })
    }
    fn forward_ports(&self, name: &str, plan: Option<super::ports::PortsPlan>) {
        let what = match plan {
            None => "none".to_string(),
            Some(p) => format!(
                "watch={} publish={:?}",
                p.watch,
                p.publish.iter().map(|p| p.to_string()).collect::<Vec<_>>()
            ),
        };
        self.calls
            .lock()
            .unwrap()
            .push(format!("forward_ports {name} {what}"));
    }
    fn reboots(&self) -> tokio::sync::broadcast::Receiver<Reboot> {
        self.reboots.subscribe()
    }
}

/// Leases addresses from 10.0.0.2 up, like the real network, and records releases.
#[derive(Default)]
struct FakeNet {
    leases: Mutex<Vec<String>>,
    released: Mutex<Vec<String>>,
    /// How many machines may hold a lease at once (0: any number).
    capacity: usize,
}

impl Net for FakeNet {
    fn lease(&self, machine: &str, _owner: u32) -> Result<NetLease, ApiError> {
        let mut leases = self.leases.lock().unwrap();
        let i = match leases.iter().position(|m| m == machine) {
            Some(i) => i,
            None if self.capacity != 0 && leases.len() >= self.capacity => {
                return Err(ApiError::new(
                    ErrorKind::Conflict,
                    format!("no network address for machine `{machine}`"),
                ));
            }
            None => {
                leases.push(machine.to_string());
                leases.len() - 1
            }
        };
        Ok(NetLease {
            ip: format!("10.0.0.{}", i + 2),
            mac: format!("52:54:00:00:00:{:02x}", i + 2),
        })
    }
    fn release(&self, machine: &str) -> Result<(), ApiError> {
        self.leases.lock().unwrap().retain(|m| m != machine);
        self.released.lock().unwrap().push(machine.to_string());
        Ok(())
    }
}

/// No kernel installed, software emulation.
/// A platform without a kernel until the first boot installs the recommended one.
#[derive(Default)]
struct FakePlatform {
    installed: Mutex<Option<KernelInfo>>,
    installs: std::sync::atomic::AtomicUsize,
}

#[async_trait]
impl Platform for FakePlatform {
    fn virtualization(&self) -> String {
        "tcg (fake)".into()
    }
    fn kernel(&self) -> Option<KernelInfo> {
        self.installed.lock().unwrap().clone()
    }
    async fn set_kernel(&self, _: KernelSetRequest) -> Result<KernelInfo, ApiError> {
        unused()
    }
    async fn ensure_kernel(&self) -> Result<Option<KernelInfo>, ApiError> {
        let mut installed = self.installed.lock().unwrap();
        if installed.is_some() {
            return Ok(None);
        }
        self.installs
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let info = KernelInfo {
            name: "6.1.0-test".into(),
            version: "6.1.0-test".into(),
            path: "/kernels/6.1.0-test/vmlinuz".into(),
            digest: "sha256:00".into(),
            modules: None,
        };
        *installed = Some(info.clone());
        Ok(Some(info))
    }
}

/// A host with two users, `root` and `nobody`; every directory under /srv is readable by
/// root alone, and the only files are kernels under /boot.
struct FakeHost;

impl Host for FakeHost {
    fn user(&self, uid: u32) -> Result<MachineUser, ApiError> {
        let (name, home) = match uid {
            0 => ("root", "/root"),
            65534 => ("nobody", "/nonexistent"),
            _ => return Err(ApiError::invalid(format!("uid {uid} has no passwd entry"))),
        };
        Ok(MachineUser {
            name: name.into(),
            uid,
            gid: uid,
            home: home.into(),
            shell: "/bin/sh".into(),
        })
    }
    fn can_read_dir(&self, uid: u32, _gid: u32, path: &str) -> Result<bool, ApiError> {
        Ok(path.starts_with("/srv/") && uid == 0)
    }
    fn is_file(&self, path: &Path) -> bool {
        path.starts_with("/boot/")
    }
    fn is_dir(&self, path: &Path) -> bool {
        path.starts_with("/srv/") || path == Path::new("/root")
    }
}

struct Fixture {
    core: Core,
    images: Arc<FakeImages>,
    vms: Arc<FakeVms>,
    net: Arc<FakeNet>,
    platform: Arc<FakePlatform>,
    _dir: tempfile::TempDir,
}

fn fixture() -> Fixture {
    fixture_with_net(FakeNet::default())
}

fn fixture_with_net(net: FakeNet) -> Fixture {
    fixture_with(net, &[])
}

/// A fixture whose service reads `config` (TOML) as its config file.
fn fixture_with(net: FakeNet, config: &[&str]) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let vms = Arc::new(FakeVms::default());
    let images = Arc::new(FakeImages::default());
    let net = Arc::new(net);
    let platform = Arc::new(FakePlatform::default());
    let files: Vec<PathBuf> = config
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let p = dir.path().join(format!("config{i}.toml"));
            std::fs::write(&p, text).unwrap();
            p
        })
        .collect();
    let config = load(
        &files,
        HostFacts {
            cpus: 4,
            memory: 8 << 30,
        },
    )
    .unwrap();
    let core = Core::open(
        ServiceOptions {
            root: dir.path().join("root"),
            run_dir: dir.path().join("run"),
            socket: dir.path().join("s.sock"),
        },
        config,
        Ports {
            images: images.clone(),
            vms: vms.clone(),
            net: net.clone(),
            platform: platform.clone(),
            host: Arc::new(FakeHost),
        },
    )
    .unwrap();
    Fixture {
        core,
        images,
        vms,
        net,
        platform,
        _dir: dir,
    }
}

/// Callers with a passwd entry on the fake host.
const ROOT: Caller = Caller {
    uid: 0,
    gid: 0,
    pid: None,
};
/// A second user.
const NOBODY: Caller = Caller {
    uid: 65534,
    gid: 65534,
    pid: None,
};

fn create(image: &str, name: Option<&str>) -> Request {
    Request::MachineCreate(CreateRequest {
        image: image.into(),
        name: name.map(Into::into),
        no_boot: true,
        home_mount: Some(container_api::machine::HomeMount::None),
        ..Default::default()
    })
}

async fn machine(core: &Core, caller: &Caller, req: Request) -> Result<Machine, ApiError> {
    match core.handle(caller, req).await? {
        Reply::Machine(m) => Ok(*m),
        other => panic!("unexpected reply {other:?}"),
    }
}

async fn names(core: &Core, caller: &Caller) -> Vec<String> {
    match core.handle(caller, Request::MachineList).await.unwrap() {
        Reply::Machines(ms) => ms.into_iter().map(|m| m.id).collect(),
        other => panic!("unexpected reply {other:?}"),
    }
}

#[tokio::test]
async fn create_derives_names_and_the_first_machine_is_the_default() {
    let f = fixture();
    let m = machine(&f.core, &ROOT, create("busybox", None))
        .await
        .unwrap();
    assert_eq!(m.id, "busybox-latest");
    assert!(m.default);
    assert_eq!(m.status, MachineState::Stopped);
    assert_eq!(m.cpus, 2, "half the host's cpus");
    assert_eq!(m.memory, 4 << 30, "half the host's memory");
    let second = machine(&f.core, &ROOT, create("debian", Some("db")))
        .await
        .unwrap();
    assert!(!second.default);
    let dup = machine(&f.core, &ROOT, create("busybox", None))
        .await
        .unwrap_err();
    assert_eq!(dup.kind, ErrorKind::AlreadyExists);
    assert!(dup.message.contains("-n/--name"), "{}", dup.message);
}

#[tokio::test]
async fn images_without_init_and_bad_values_change_nothing() {
    let f = fixture();
    let e = machine(&f.core, &ROOT, create("noinit", Some("x")))
        .await
        .unwrap_err();
    assert!(e.message.contains("/sbin/init"), "{}", e.message);
    let e = machine(&f.core, &ROOT, create("busybox", Some("Bad.Name")))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidArgument);
    let mut small = CreateRequest {
        image: "busybox".into(),
        memory: Some(1 << 20),
        no_boot: true,
        ..Default::default()
    };
    assert!(
        machine(&f.core, &ROOT, Request::MachineCreate(small.clone()))
            .await
            .is_err()
    );
    small.memory = None;
    small.cpus = Some(0);
    assert!(
        machine(&f.core, &ROOT, Request::MachineCreate(small))
            .await
            .is_err()
    );
    assert!(names(&f.core, &ROOT).await.is_empty());
    assert!(f.vms.calls.lock().unwrap().is_empty());
}

#[tokio::test]
async fn other_users_machines_are_not_found() {
    let f = fixture();
    machine(&f.core, &ROOT, create("busybox", Some("rootbox")))
        .await
        .unwrap();
    assert!(names(&f.core, &NOBODY).await.is_empty());
    for req in [
        Request::MachineInspect("rootbox".into()),
        Request::MachineStart("rootbox".into()),
        Request::MachineStop("rootbox".into(), StopRequest::default()),
        Request::MachineDelete {
            name: "rootbox".into(),
            force: true,
        },
        Request::MachineSetDefault("rootbox".into()),
    ] {
        let e = f.core.handle(&NOBODY, req).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound, "{}", e.message);
    }
    machine(&f.core, &NOBODY, create("busybox", Some("mine")))
        .await
        .unwrap();
    assert_eq!(names(&f.core, &NOBODY).await, ["mine"]);
    assert_eq!(names(&f.core, &ROOT).await, ["mine", "rootbox"]);
    assert!(
        f.vms
            .calls
            .lock()
            .unwrap()
            .iter()
            .all(|c| !c.contains("rootbox"))
    );
}

#[tokio::test]
async fn running_machines_need_force_to_delete_and_stop_uses_the_image_signal() {
    let f = fixture();
    machine(&f.core, &ROOT, create("debian", Some("db")))
        .await
        .unwrap();
    machine(&f.core, &ROOT, Request::MachineStart("db".into()))
        .await
        .unwrap();
    let e = machine(
        &f.core,
        &ROOT,
        Request::MachineDelete {
            name: "db".into(),
            force: false,
        },
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Conflict);
    assert_eq!(names(&f.core, &ROOT).await, ["db"]);
    machine(
        &f.core,
        &ROOT,
        Request::MachineStop("db".into(), StopRequest::default()),
    )
    .await
    .unwrap();
    let rtmin3 = libc::SIGRTMIN() + 3;
    assert!(
        f.vms
            .calls
            .lock()
            .unwrap()
            .contains(&format!("shutdown db Some({rtmin3})"))
    );
    let deleted = machine(
        &f.core,
        &ROOT,
        Request::MachineDelete {
            name: "db".into(),
            force: false,
        },
    )
    .await
    .unwrap();
    assert!(deleted.default);
    assert!(names(&f.core, &ROOT).await.is_empty());
}

#[tokio::test]
async fn set_validates_keys_and_says_when_a_restart_is_needed() {
    let f = fixture();
    machine(&f.core, &ROOT, create("busybox", Some("dev")))
        .await
        .unwrap();
    let set = |settings: &[&str]| Request::MachineSet {
        name: "dev".into(),
        settings: SetRequest::parse(settings).unwrap(),
    };
    let e = SetRequest::parse(&["cpu=2"]).unwrap_err();
    assert!(e.contains("valid keys"), "{e}");
    assert!(SetRequest::parse(&["memory=lots"]).is_err());
    let off = SetRequest::parse(&["forward-ports=off"]).unwrap();
    assert_eq!(off.forward_ports, Some(false));
    let e = SetRequest::parse(&["forward-ports=maybe"]).unwrap_err();
    assert!(e.contains("forward-ports must be on or off"), "{e}");
    let e = f.core.handle(&ROOT, set(&[])).await.unwrap_err();
    assert!(e.message.contains("KEY=VALUE"), "{}", e.message);
    let e = f
        .core
        .handle(&ROOT, set(&["disk-size=1G"]))
        .await
        .unwrap_err();
    assert!(e.message.contains("only grow"), "{}", e.message);
    // The one validator of create and set: the same limits, the same words.
    let e = f
        .core
        .handle(&ROOT, set(&["cpus=3", "memory=100M"]))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidArgument);
    assert!(
        e.message.contains("memory must be between 256M and 8G"),
        "{}",
        e.message
    );
    let e = f.core.handle(&ROOT, set(&["cpus=0"])).await.unwrap_err();
    assert!(
        e.message.contains("cpus must be between 1 and 4"),
        "{}",
        e.message
    );
    let Reply::Machine(m) = f
        .core
        .handle(&ROOT, Request::MachineInspect("dev".into()))
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(m.cpus, 2, "a failed set changed nothing");

    let Reply::Set(r) = f
        .core
        .handle(&ROOT, set(&["cpus=3", "disk-size=128G"]))
        .await
        .unwrap()
    else {
        panic!()
    };
    assert!(!r.takes_effect_at_next_start);
    assert_eq!(r.machine.cpus, 3);
    assert!(
        f.vms
            .calls
            .lock()
            .unwrap()
            .contains(&format!("grow_disk {}", 128u64 << 30))
    );

    machine(&f.core, &ROOT, Request::MachineStart("dev".into()))
        .await
        .unwrap();
    let Reply::Set(r) = f.core.handle(&ROOT, set(&["memory=2G"])).await.unwrap() else {
        panic!()
    };
    assert!(r.takes_effect_at_next_start);
    assert!(r.machine.pending_restart);
}

#[tokio::test]
async fn networked_machines_hold_a_sticky_address_from_create_to_rm() {
    let f = fixture();
    let a = machine(&f.core, &ROOT, create("busybox", Some("a")))
        .await
        .unwrap();
    let b = machine(&f.core, &ROOT, create("busybox", Some("b")))
        .await
        .unwrap();
    assert_eq!(a.reserved_ip_address.as_deref(), Some("10.0.0.2"));
    assert_eq!(b.reserved_ip_address.as_deref(), Some("10.0.0.3"));
    // `ipAddress` is the running machine's, as in Apple's schema.
    assert_eq!(a.ip_address, None);
    // Start and stop keep the address.
    machine(&f.core, &ROOT, Request::MachineStart("a".into()))
        .await
        .unwrap();
    let booted = f.vms.running.lock().unwrap()["a"].record.clone();
    assert_eq!(booted.ip_address.as_deref(), Some("10.0.0.2"));
    assert_eq!(booted.mac, "52:54:00:00:00:02");
    let running = machine(&f.core, &ROOT, Request::MachineInspect("a".into()))
        .await
        .unwrap();
    assert_eq!(running.ip_address.as_deref(), Some("10.0.0.2"));
    machine(
        &f.core,
        &ROOT,
        Request::MachineStop("a".into(), StopRequest::default()),
    )
    .await
    .unwrap();
    let again = machine(&f.core, &ROOT, Request::MachineInspect("a".into()))
        .await
        .unwrap();
    assert_eq!(again.reserved_ip_address.as_deref(), Some("10.0.0.2"));
    assert_eq!(again.ip_address, None);
    // rm releases it.
    machine(
        &f.core,
        &ROOT,
        Request::MachineDelete {
            name: "a".into(),
            force: false,
        },
    )
    .await
    .unwrap();
    assert_eq!(*f.net.released.lock().unwrap(), ["a"]);
    // `--network none` takes no address.
    let mut req = CreateRequest {
        image: "busybox".into(),
        name: Some("offline".into()),
        no_boot: true,
        network: Some("none".into()),
        home_mount: Some(container_api::machine::HomeMount::None),
        ..Default::default()
    };
    let offline = machine(&f.core, &ROOT, Request::MachineCreate(req.clone()))
        .await
        .unwrap();
    assert_eq!(offline.reserved_ip_address, None);
    assert_eq!(offline.network, "none");
    assert!(
        !f.net
            .leases
            .lock()
            .unwrap()
            .contains(&"offline".to_string())
    );
    req.network = Some("bogus".into());
    req.name = Some("bogus".into());
    let err = machine(&f.core, &ROOT, Request::MachineCreate(req))
        .await
        .unwrap_err();
    assert!(err.message.contains("unknown network"), "{}", err.message);
}

#[tokio::test]
async fn an_exhausted_subnet_fails_create_and_leaves_nothing() {
    let f = fixture_with_net(FakeNet {
        capacity: 1,
        ..Default::default()
    });
    machine(&f.core, &ROOT, create("busybox", Some("first")))
        .await
        .unwrap();
    let err = machine(&f.core, &ROOT, create("busybox", Some("second")))
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Conflict);
    assert!(
        err.message.contains("no network address"),
        "{}",
        err.message
    );
    assert_eq!(names(&f.core, &ROOT).await, ["first"]);
    assert!(
        f.vms
            .calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.starts_with("create_disk"))
            .count()
            == 1,
        "no disk made for the refused machine"
    );
}

#[tokio::test]
async fn a_machine_whose_guest_rebooted_boots_again_unless_it_is_gone() {
    let f = fixture();
    two_running(&f, ["rb", "gone"]).await;
    f.core
        .handle(
            &ROOT,
            Request::MachineDelete {
                name: "gone".into(),
                force: true,
            },
        )
        .await
        .unwrap();
    // Reboots are handled in order: once `rb` runs again, `gone`'s was dealt with.
    f.vms.guest_reboots("gone");
    f.vms.guest_reboots("rb");
    f.vms.until_running("rb").await;
    assert_eq!(f.vms.boots("rb"), 2);
    assert_eq!(
        f.vms.boots("gone"),
        1,
        "a removed machine is not brought back"
    );
    assert_eq!(names(&f.core, &ROOT).await, ["rb"]);
}

/// Two machines, running.
async fn two_running(f: &Fixture, names: [&str; 2]) {
    f.core.follow_reboots();
    for name in names {
        machine(&f.core, &ROOT, create("busybox", Some(name)))
            .await
            .unwrap();
        machine(&f.core, &ROOT, Request::MachineStart(name.into()))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_stop_asked_for_while_a_reboot_is_reported_is_not_undone() {
    let f = fixture();
    two_running(&f, ["rb", "other"]).await;
    // The guest goes down; the user's stop finds it stopped before the reboot is handled.
    let at = f.vms.guest_goes_down("rb");
    let stop = Request::MachineStop("rb".into(), StopRequest::default());
    machine(&f.core, &ROOT, stop).await.unwrap();
    f.vms.report_reboot("rb", at);
    f.vms.guest_reboots("other");
    f.vms.until_running("other").await;
    assert_eq!(f.vms.state("rb"), MachineState::Stopped);
    assert_eq!(f.vms.boots("rb"), 1, "the stop was undone");
    // A stop asked for before the guest went down does not hold back a later reboot.
    machine(&f.core, &ROOT, Request::MachineStart("rb".into()))
        .await
        .unwrap();
    f.vms.guest_reboots("rb");
    f.vms.until_running("rb").await;
}

#[tokio::test]
async fn a_guest_that_keeps_rebooting_is_left_stopped_until_started_again() {
    let f = fixture();
    two_running(&f, ["loop", "other"]).await;
    for _ in 0..machines::REBOOT_LIMIT {
        f.vms.guest_reboots("loop");
        f.vms.until_running("loop").await;
    }
    f.vms.guest_reboots("loop");
    f.vms.guest_reboots("other");
    f.vms.until_running("other").await;
    assert_eq!(f.vms.state("loop"), MachineState::Stopped);
    assert_eq!(f.vms.boots("loop"), 1 + machines::REBOOT_LIMIT);
    // A start by request gives it a fresh allowance.
    machine(&f.core, &ROOT, Request::MachineStart("loop".into()))
        .await
        .unwrap();
    f.vms.guest_reboots("loop");
    f.vms.until_running("loop").await;
    assert_eq!(f.vms.boots("loop"), 3 + machines::REBOOT_LIMIT);
}

#[tokio::test]
async fn mounts_and_kernels_are_checked_against_the_host_as_the_caller() {
    let f = fixture();
    let with = |name: &str, mount: Option<&str>, kernel: Option<&str>| {
        Request::MachineCreate(CreateRequest {
            image: "busybox".into(),
            name: Some(name.into()),
            no_boot: true,
            home_mount: Some(container_api::machine::HomeMount::None),
            mounts: mount
                .map(|m| container_api::machine::MountSpec {
                    host_path: m.into(),
                    guest_path: "/data".into(),
                    read_only: false,
                })
                .into_iter()
                .collect(),
            kernel: kernel.map(Into::into),
            ..Default::default()
        })
    };
    // The host lets root, not nobody, read /srv/data: nobody may not mount it.
    let e = machine(&f.core, &NOBODY, with("a", Some("/srv/data"), None))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::PermissionDenied);
    assert!(e.message.contains("/srv/data"), "{}", e.message);
    assert!(names(&f.core, &NOBODY).await.is_empty(), "nothing created");
    let m = machine(&f.core, &ROOT, with("b", Some("/srv/data"), None))
        .await
        .unwrap();
    assert_eq!(m.mounts[0].guest_path, "/data");
    let e = machine(&f.core, &ROOT, with("c", None, Some("/nope/vmlinuz")))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidArgument);
    assert!(e.message.contains("/nope/vmlinuz"), "{}", e.message);
    machine(&f.core, &ROOT, with("d", None, Some("/boot/vmlinuz")))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_users_upload_stops_at_the_load_limit_and_roots_does_not() {
    let f = fixture_with(
        FakeNet::default(),
        &["[limits]\nimage-load-size = \"1M\"\n"],
    );
    let load = |who: &'static Caller, bytes: usize| {
        let core = f.core.clone();
        async move {
            let archive = Box::new(std::io::Cursor::new(vec![0u8; bytes]));
            let request = Request::ImageLoad {
                archive,
                system: false,
            };
            core.handle(who, request).await
        }
    };
    load(&NOBODY, 1 << 20).await.unwrap();
    let e = load(&NOBODY, (1 << 20) + 1).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::PermissionDenied, "{}", e.message);
    assert!(
        e.message.contains("larger than 1M") && e.message.contains("limits.image-load-size"),
        "{}",
        e.message
    );
    load(&ROOT, 3 << 20).await.unwrap();
    // The refused upload loaded nothing.
    let loads: Vec<String> = f
        .images
        .calls()
        .into_iter()
        .filter(|c| c.starts_with("load"))
        .collect();
    assert_eq!(loads, ["load User(65534) 1048576", "load User(0) 3145728"]);
}

#[tokio::test]
async fn nobody_gets_more_than_the_host_and_users_stay_within_their_limits() {
    let f = fixture_with(
        FakeNet::default(),
        &[
            "[limits]\nmachines = 2\nrunning-cpus = 3\nrunning-memory = \"3G\"\ndisk-size = \"100G\"\n",
        ],
    );
    let sized = |name: &str, cpus: u32, memory: u64, disk: u64| {
        Request::MachineCreate(CreateRequest {
            image: "busybox".into(),
            name: Some(name.into()),
            no_boot: true,
            home_mount: Some(container_api::machine::HomeMount::None),
            cpus: Some(cpus),
            memory: Some(memory),
            disk_size: Some(disk << 30),
            ..Default::default()
        })
    };
    // The host has 4 CPUs and 8G: more is refused for root too.
    for (cpus, memory) in [(5, 1), (1, 9)] {
        let e = machine(&f.core, &ROOT, sized("big", cpus, memory << 30, 10))
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument, "{}", e.message);
        assert!(e.message.contains("the host's"), "{}", e.message);
    }
    // A user's disk is capped; root's is not.
    let e = machine(&f.core, &NOBODY, sized("a", 1, 1 << 30, 200))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::PermissionDenied);
    assert!(e.message.contains("limits.disk-size"), "{}", e.message);
    machine(&f.core, &ROOT, sized("r", 1, 1 << 30, 200))
        .await
        .unwrap();
    // Two machines, then no more.
    machine(&f.core, &NOBODY, sized("a", 2, 2 << 30, 10))
        .await
        .unwrap();
    machine(&f.core, &NOBODY, sized("b", 2, 1 << 30, 10))
        .await
        .unwrap();
    let e = machine(&f.core, &NOBODY, sized("c", 1, 1 << 30, 10))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::PermissionDenied);
    assert!(e.message.contains("limits.machines"), "{}", e.message);
    // Running totals: a (2 CPUs) runs; b would make 4 CPUs, over 3; nothing booted.
    machine(&f.core, &NOBODY, Request::MachineStart("a".into()))
        .await
        .unwrap();
    let e = machine(&f.core, &NOBODY, Request::MachineStart("b".into()))
        .await
        .unwrap_err();
    assert!(e.message.contains("limits.running-cpus"), "{}", e.message);
    assert_eq!(f.vms.boots("b"), 0);
    // Once a stops, b may run.
    machine(
        &f.core,
        &NOBODY,
        Request::MachineStop("a".into(), Default::default()),
    )
    .await
    .unwrap();
    machine(&f.core, &NOBODY, Request::MachineStart("b".into()))
        .await
        .unwrap();
}

#[tokio::test]
async fn limits_hold_when_a_user_s_creates_and_starts_race() {
    let f = fixture_with(
        FakeNet::default(),
        &["[limits]\nmachines = 2\nrunning-cpus = 3\nrunning-memory = \"8G\"\n"],
    );
    let sized = |name: &str| {
        Request::MachineCreate(CreateRequest {
            image: "busybox".into(),
            name: Some(name.into()),
            no_boot: true,
            home_mount: Some(container_api::machine::HomeMount::None),
            cpus: Some(2),
            ..Default::default()
        })
    };
    // Three creates at once (the fake image store and VMs yield, as the real ones wait):
    // two machines are the most.
    let made =
        futures::future::join_all(["a", "b", "c"].map(|n| machine(&f.core, &NOBODY, sized(n))))
            .await;
    let refused: Vec<&ApiError> = made.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(refused.len(), 1, "{made:?}");
    assert!(
        refused[0].message.contains("limits.machines"),
        "{refused:?}"
    );
    // Two starts at once of 2 vCPUs each, under a limit of 3 running: one boots.
    let names: Vec<String> = made.into_iter().flatten().map(|m| m.id).collect();
    let started = futures::future::join_all(
        names
            .iter()
            .map(|n| machine(&f.core, &NOBODY, Request::MachineStart(n.clone()))),
    )
    .await;
    let refused: Vec<&ApiError> = started.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(refused.len(), 1, "{started:?}");
    assert!(
        refused[0].message.contains("limits.running-cpus"),
        "{refused:?}"
    );
    assert_eq!(names.iter().map(|n| f.vms.boots(n)).sum::<usize>(), 1);
}

#[tokio::test]
async fn prune_removes_only_the_caller_s_own_images_none_of_their_machines_uses() {
    let f = fixture();
    *f.images.listed.lock().unwrap() = vec![
        summary_of("busybox", Namespace::User(NOBODY.uid)),
        summary_of("debian", Namespace::User(NOBODY.uid)),
        summary_of("private", Namespace::User(0)),
        summary_of("noinit", Namespace::System),
    ];
    machine(&f.core, &NOBODY, create("busybox", Some("mine")))
        .await
        .unwrap();
    // Root's machine from `debian` is not one the user sees: it keeps nothing of theirs.
    machine(&f.core, &ROOT, create("debian", Some("roots")))
        .await
        .unwrap();
    let prune = |all: bool, system: bool| Request::ImagePrune { all, system };
    f.images.calls();

    let Reply::Removed(r) = f.core.handle(&NOBODY, prune(false, false)).await.unwrap() else {
        panic!("a removal report")
    };
    assert!(r.untagged.is_empty() && r.freed_bytes == 0, "{r:?}");
    assert!(
        f.images.calls().is_empty(),
        "without --all nothing is touched"
    );

    let Reply::Removed(r) = f.core.handle(&NOBODY, prune(true, false)).await.unwrap() else {
        panic!("a removal report")
    };
    assert_eq!(r.untagged, ["debian"]);
    let removes: Vec<String> = f
        .images
        .calls()
        .into_iter()
        .filter(|c| c.starts_with("remove"))
        .collect();
    assert_eq!(removes.len(), 1, "{removes:?}");
    assert!(
        removes[0].starts_with("remove User(65534) debian "),
        "{removes:?}"
    );

    let e = f.core.handle(&NOBODY, prune(true, true)).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::PermissionDenied, "{}", e.message);
    assert!(f.images.calls().is_empty());
}

#[tokio::test]
async fn disk_usage_counts_what_the_caller_sees_and_what_prune_or_rm_would_free() {
    let f = fixture();
    *f.images.listed.lock().unwrap() = vec![
        summary_of("busybox", Namespace::User(NOBODY.uid)),
        summary_of("debian", Namespace::User(NOBODY.uid)),
        summary_of("private", Namespace::User(0)),
        summary_of("noinit", Namespace::System),
    ];
    for name in ["up", "down"] {
        machine(&f.core, &NOBODY, create("busybox", Some(name)))
            .await
            .unwrap();
    }
    machine(&f.core, &NOBODY, Request::MachineStart("up".into()))
        .await
        .unwrap();
    f.core
        .handle(
            &NOBODY,
            Request::SnapshotCreate {
                name: "down".into(),
                snapshot: Some("s1".into()),
            },
        )
        .await
        .unwrap();
    // Root's machine from `debian` is not one the user sees: it keeps nothing of theirs.
    machine(&f.core, &ROOT, create("debian", Some("roots")))
        .await
        .unwrap();
    let df = |caller: &'static Caller| {
        let core = f.core.clone();
        async move {
            match core.handle(caller, Request::DiskUsage).await.unwrap() {
                Reply::DiskUsage(d) => d,
                other => panic!("unexpected reply {other:?}"),
            }
        }
    };
    f.images.calls();

    let d = df(&NOBODY).await;
    // Three images seen (their two, the system's); the machines use one. Only their own
    // unused name would go, never the system's.
    assert_eq!((d.images.total, d.images.active), (3, 1), "{d:?}");
    assert_eq!((d.images.size, d.images.reclaimable), (3 << 20, 1 << 10));
    assert!(
        f.images
            .calls()
            .contains(&r#"usage User(65534) ["debian"]"#.to_string())
    );
    // Two machines, one up; the stopped one's disk and snapshot are what deleting it frees.
    assert_eq!((d.machines.total, d.machines.active), (2, 1), "{d:?}");
    assert_eq!(d.machines.size, 3 * 4096, "two disks and a snapshot");
    assert_eq!(d.machines.reclaimable, 2 * 4096);

    // Root: their own name and the system's; every machine.
    let d = df(&ROOT).await;
    assert_eq!((d.images.total, d.images.active), (2, 0), "{d:?}");
    assert!(
        f.images
            .calls()
            .contains(&r#"usage User(0) ["private"]"#.to_string())
    );
    assert_eq!((d.machines.total, d.machines.active), (3, 1), "{d:?}");
}

#[tokio::test]
async fn ownership_is_decided_under_the_machines_lock() {
    let f = fixture();
    machine(&f.core, &NOBODY, create("busybox", Some("dev")))
        .await
        .unwrap();
    // nobody's delete passes the first check, then waits for the machine's lock...
    let held = f.core.state.locks.lock("dev").await;
    let core = f.core.clone();
    let delete = tokio::spawn(async move {
        machine(
            &core,
            &NOBODY,
            Request::MachineDelete {
                name: "dev".into(),
                force: true,
            },
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    // ...while the machine is replaced by root's machine of the same name.
    let mut record = f.core.state.machines.get("dev").unwrap();
    record.owner_uid = 0;
    f.core.state.machines.save(&record).unwrap();
    drop(held);
    let e = delete.await.unwrap().unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound, "{}", e.message);
    assert_eq!(
        names(&f.core, &ROOT).await,
        ["dev"],
        "root's machine survives"
    );
}

#[tokio::test]
async fn a_stop_timeout_is_bounded() {
    let f = fixture();
    machine(&f.core, &ROOT, create("busybox", Some("dev")))
        .await
        .unwrap();
    machine(&f.core, &ROOT, Request::MachineStart("dev".into()))
        .await
        .unwrap();
    let stop = |secs| {
        Request::MachineStop(
            "dev".into(),
            StopRequest {
                timeout_secs: Some(secs),
                ..Default::default()
            },
        )
    };
    let e = machine(&f.core, &ROOT, stop(u64::MAX)).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidArgument);
    assert!(e.message.contains("at most 3600"), "{}", e.message);
    assert_eq!(
        f.vms.state("dev"),
        MachineState::Running,
        "nothing was done"
    );
    let m = machine(&f.core, &ROOT, stop(3600)).await.unwrap();
    assert_eq!(m.status, MachineState::Stopped);
}

/// The requests that touch image names, acting in the caller's namespace or (`system`) the
/// system-wide one.
fn image_requests(system: bool) -> Vec<Request> {
    vec![
        Request::ImageTag(container_api::image::TagRequest {
            source: "busybox".into(),
            target: "debian:12".into(),
            system,
        }),
        Request::ImageLoad {
            archive: Box::new(tokio::io::empty()),
            system,
        },
        Request::ImageRemove {
            reference: "debian:12".into(),
            force: false,
            system,
        },
    ]
}

async fn pull(f: &Fixture, caller: &Caller, system: bool) -> PullEvent {
    let (tx, mut rx) = tokio::sync::mpsc::channel(8);
    f.core
        .handle(
            caller,
            Request::ImagePull {
                reference: "debian:12".into(),
                system,
                events: tx,
            },
        )
        .await
        .unwrap();
    rx.recv().await.unwrap()
}

#[tokio::test]
async fn a_user_changes_only_their_own_image_names_and_only_root_the_system_ones() {
    let f = fixture();
    // A user asking for the system namespace, or for everyone's names, reaches no store.
    for req in image_requests(true)
        .into_iter()
        .chain([Request::ImageList { all: true }])
    {
        let what = format!("{req:?}");
        let e = f.core.handle(&NOBODY, req).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::PermissionDenied, "{what}: {}", e.message);
    }
    match pull(&f, &NOBODY, true).await {
        PullEvent::Error { error } => assert_eq!(error.kind, ErrorKind::PermissionDenied),
        other => panic!("{other:?}"),
    }
    assert!(f.images.calls().is_empty());

    // Without it, every request acts in the caller's own namespace.
    for req in image_requests(false).into_iter().chain([
        Request::ImageList { all: false },
        Request::ImageSave(vec!["debian:12".into()]),
    ]) {
        f.core.handle(&NOBODY, req).await.unwrap();
    }
    assert!(matches!(
        pull(&f, &NOBODY, false).await,
        PullEvent::Done { .. }
    ));
    let calls = f.images.calls();
    assert_eq!(calls.len(), 6, "{calls:?}");
    assert!(calls.iter().all(|c| c.contains("User(65534)")), "{calls:?}");

    // Root publishes in the system namespace (pulling with its own credentials) and lists all.
    for req in image_requests(true)
        .into_iter()
        .chain([Request::ImageList { all: true }])
    {
        f.core.handle(&ROOT, req).await.unwrap();
    }
    match pull(&f, &ROOT, true).await {
        PullEvent::Done { image } => assert!(image.is_system()),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        f.images.calls(),
        [
            "tag System busybox debian:12",
            "load System 0",
            "remove System debian:12 {}",
            "list_all",
            "pull System debian:12 as 0",
        ]
    );
}

#[tokio::test]
async fn image_removal_keeps_every_machines_image_but_names_only_the_callers_machines() {
    let f = fixture();
    machine(&f.core, &ROOT, create("busybox", Some("rootbox")))
        .await
        .unwrap();
    machine(&f.core, &NOBODY, create("debian", Some("mine")))
        .await
        .unwrap();
    let rm = || Request::ImageRemove {
        reference: "x".into(),
        force: false,
        system: false,
    };
    f.core.handle(&NOBODY, rm()).await.unwrap();
    f.core.handle(&ROOT, rm()).await.unwrap();
    assert_eq!(
        f.images.calls(),
        [
            r#"remove User(65534) x {"sha256:busybox": [], "sha256:debian": ["mine"]}"#,
            r#"remove User(0) x {"sha256:busybox": ["rootbox"], "sha256:debian": ["mine"]}"#,
        ]
    );
}

#[tokio::test]
async fn machines_are_created_only_from_names_the_caller_sees() {
    let f = fixture();
    let e = machine(&f.core, &NOBODY, create("private", Some("stolen")))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound, "{}", e.message);
    assert!(names(&f.core, &NOBODY).await.is_empty());
    machine(&f.core, &ROOT, create("private", Some("own")))
        .await
        .unwrap();
}

#[tokio::test]
async fn the_first_boot_installs_the_recommended_kernel_once() {
    let f = fixture();
    let installs = || {
        f.platform
            .installs
            .load(std::sync::atomic::Ordering::SeqCst)
    };
    // Created without booting: nothing needs a kernel yet.
    f.core
        .handle(&ROOT, create("busybox", Some("a")))
        .await
        .unwrap();
    assert_eq!(installs(), 0);
    f.core
        .handle(&ROOT, Request::MachineStart("a".into()))
        .await
        .unwrap();
    assert_eq!(installs(), 1);
    assert!(f.core.handle(&ROOT, Request::SystemStatus).await.is_ok());
    f.core
        .handle(&ROOT, Request::MachineStop("a".into(), Default::default()))
        .await
        .unwrap();
    f.core
        .handle(&ROOT, Request::MachineStart("a".into()))
        .await
        .unwrap();
    assert_eq!(installs(), 1, "an installed kernel is kept");

    // A kernel named in config is used as it is.
    let f = fixture_with(
        FakeNet::default(),
        &["[kernel]\nbinary = \"/boot/vmlinuz\"\n"],
    );
    f.core
        .handle(&ROOT, create("busybox", Some("b")))
        .await
        .unwrap();
    f.core
        .handle(&ROOT, Request::MachineStart("b".into()))
        .await
        .unwrap();
    assert_eq!(
        f.platform
            .installs
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

/// The fake disk's bytes (the fakes' disks are files holding what the tests put there).
fn disk_of(f: &Fixture, name: &str) -> String {
    let path = f.core.state.machines.disk_path(name);
    std::fs::read_to_string(path).unwrap()
}

fn write_disk(f: &Fixture, name: &str, text: &str) {
    std::fs::write(f.core.state.machines.disk_path(name), text).unwrap();
}

#[tokio::test]
async fn a_clone_has_the_disk_and_settings_with_its_own_name_address_and_identity() {
    let f = fixture();
    machine(&f.core, &NOBODY, create("busybox", Some("src")))
        .await
        .unwrap();
    write_disk(&f, "src", "before");
    let clone = machine(
        &f.core,
        &NOBODY,
        Request::MachineClone {
            name: "src".into(),
            new: "copy".into(),
        },
    )
    .await
    .unwrap();
    assert_eq!(clone.id, "copy");
    assert_eq!(clone.status, MachineState::Stopped);
    assert_eq!(disk_of(&f, "copy"), "before");
    let (src, copy) = (
        f.core.state.machines.get("src").unwrap(),
        f.core.state.machines.get("copy").unwrap(),
    );
    assert_eq!(
        (src.cpus, src.memory, &src.image),
        (copy.cpus, copy.memory, &copy.image)
    );
    assert_ne!(src.ip_address, copy.ip_address);
    assert_ne!(src.mac, copy.mac);
    assert!(copy.instance.is_some());
    assert_ne!(src.instance, copy.instance);
    // A taken name, a bad name and a missing source are refused.
    for (from, to, kind) in [
        ("src", "copy", ErrorKind::AlreadyExists),
        ("src", "Bad_Name", ErrorKind::InvalidArgument),
        ("absent", "x", ErrorKind::NotFound),
    ] {
        let req = Request::MachineClone {
            name: from.into(),
            new: to.into(),
        };
        assert_eq!(f.core.handle(&NOBODY, req).await.unwrap_err().kind, kind);
    }
}

#[tokio::test]
async fn another_user_cannot_clone_snapshot_restore_or_rename_a_machine() {
    let f = fixture();
    machine(&f.core, &ROOT, create("busybox", Some("rootbox")))
        .await
        .unwrap();
    f.core
        .handle(
            &ROOT,
            Request::SnapshotCreate {
                name: "rootbox".into(),
                snapshot: Some("s1".into()),
            },
        )
        .await
        .unwrap();
    for req in [
        Request::MachineClone {
            name: "rootbox".into(),
            new: "stolen".into(),
        },
        Request::MachineRename {
            name: "rootbox".into(),
            new: "mine".into(),
        },
        Request::SnapshotCreate {
            name: "rootbox".into(),
            snapshot: None,
        },
        Request::SnapshotList("rootbox".into()),
        Request::SnapshotRestore {
            name: "rootbox".into(),
            snapshot: "s1".into(),
            force: true,
        },
        Request::SnapshotDelete {
            name: "rootbox".into(),
            snapshot: "s1".into(),
        },
    ] {
        let e = f.core.handle(&NOBODY, req).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound, "{}", e.message);
    }
    assert!(names(&f.core, &NOBODY).await.is_empty());
    assert_eq!(names(&f.core, &ROOT).await, ["rootbox"]);
    assert_eq!(f.core.snapshot_list(&ROOT, "rootbox").unwrap().len(), 1);
}

#[tokio::test]
async fn a_snapshot_brings_the_disk_back_and_restore_wants_the_machine_stopped() {
    let f = fixture();
    machine(&f.core, &NOBODY, create("busybox", Some("dev")))
        .await
        .unwrap();
    write_disk(&f, "dev", "v1");
    let snap = |s: &str| Request::SnapshotCreate {
        name: "dev".into(),
        snapshot: Some(s.into()),
    };
    f.core.handle(&NOBODY, snap("one")).await.unwrap();
    let e = f.core.handle(&NOBODY, snap("one")).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::AlreadyExists);
    write_disk(&f, "dev", "v2");
    let restore = |force| Request::SnapshotRestore {
        name: "dev".into(),
        snapshot: "one".into(),
        force,
    };
    f.core
        .handle(&NOBODY, Request::MachineStart("dev".into()))
        .await
        .unwrap();
    let e = f.core.handle(&NOBODY, restore(false)).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Conflict, "{}", e.message);
    assert_eq!(disk_of(&f, "dev"), "v2");
    f.core.handle(&NOBODY, restore(true)).await.unwrap();
    assert_eq!(f.vms.state("dev"), MachineState::Stopped);
    assert_eq!(disk_of(&f, "dev"), "v1");
    let listed = f.core.snapshot_list(&NOBODY, "dev").unwrap();
    assert_eq!(
        listed.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["one"]
    );
    f.core
        .handle(
            &NOBODY,
            Request::SnapshotDelete {
                name: "dev".into(),
                snapshot: "one".into(),
            },
        )
        .await
        .unwrap();
    assert!(f.core.snapshot_list(&NOBODY, "dev").unwrap().is_empty());
    let e = f.core.handle(&NOBODY, restore(true)).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
}

#[tokio::test]
async fn rename_moves_a_stopped_machine_and_its_default_pointer() {
    let f = fixture();
    machine(&f.core, &NOBODY, create("busybox", Some("old")))
        .await
        .unwrap();
    write_disk(&f, "old", "data");
    let rename = |from: &str, to: &str| Request::MachineRename {
        name: from.into(),
        new: to.into(),
    };
    f.core
        .handle(&NOBODY, Request::MachineStart("old".into()))
        .await
        .unwrap();
    let e = f
        .core
        .handle(&NOBODY, rename("old", "new"))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Conflict, "{}", e.message);
    f.core
        .handle(
            &NOBODY,
            Request::MachineStop("old".into(), StopRequest::default()),
        )
        .await
        .unwrap();
    let m = machine(&f.core, &NOBODY, rename("old", "new"))
        .await
        .unwrap();
    assert_eq!(m.id, "new");
    assert!(m.default);
    assert_eq!(names(&f.core, &NOBODY).await, ["new"]);
    assert_eq!(disk_of(&f, "new"), "data");
    assert_eq!(f.core.state.machines.get("new").unwrap().name, "new");
    machine(&f.core, &NOBODY, create("busybox", Some("other")))
        .await
        .unwrap();
    let e = f
        .core
        .handle(&NOBODY, rename("other", "new"))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::AlreadyExists);
}

async fn event_stream(core: &Core, caller: &Caller, machine: Option<&str>) -> super::EventStream {
    let request = Request::Events {
        machine: machine.map(Into::into),
    };
    match core.handle(caller, request).await.unwrap() {
        Reply::Events(s) => s,
        other => panic!("unexpected reply {other:?}"),
    }
}

async fn stats(
    core: &Core,
    caller: &Caller,
    names: &[&str],
    all: bool,
) -> Result<Vec<container_api::stats::MachineStats>, ApiError> {
    let names = names.iter().map(|n| n.to_string()).collect();
    match core
        .handle(caller, Request::MachineStats { names, all })
        .await?
    {
        Reply::Stats(s) => Ok(s),
        other => panic!("unexpected reply {other:?}"),
    }
}

#[tokio::test]
async fn events_follow_a_machines_life_in_order_and_only_for_its_owner() {
    use container_api::system::EventAction as A;
    let f = fixture();
    let mut mine = event_stream(&f.core, &NOBODY, None).await;
    let mut just_dev = event_stream(&f.core, &NOBODY, Some("dev")).await;
    let mut root = event_stream(&f.core, &ROOT, None).await;
    let stranger = Caller {
        uid: 4242,
        gid: 4242,
        pid: None,
    };
    let mut theirs = event_stream(&f.core, &stranger, None).await;
    machine(&f.core, &NOBODY, create("busybox", Some("dev")))
        .await
        .unwrap();
    machine(&f.core, &NOBODY, create("busybox", Some("other")))
        .await
        .unwrap();
    f.core
        .handle(&NOBODY, Request::MachineStart("dev".into()))
        .await
        .unwrap();
    f.core
        .handle(
            &NOBODY,
            Request::MachineStop("dev".into(), StopRequest::default()),
        )
        .await
        .unwrap();
    f.core
        .handle(
            &NOBODY,
            Request::MachineDelete {
                name: "dev".into(),
                force: false,
            },
        )
        .await
        .unwrap();
    let mut seen = Vec::new();
    for _ in 0..7 {
        let e = mine.next().await.unwrap();
        seen.push((e.machine, e.action));
    }
    let dev = |a| ("dev".to_string(), a);
    assert_eq!(
        seen,
        [
            dev(A::Created),
            ("other".to_string(), A::Created),
            dev(A::Booting),
            dev(A::Running),
            dev(A::Stopping),
            dev(A::Stopped),
            dev(A::Deleted),
        ]
    );
    let mut only = Vec::new();
    for _ in 0..6 {
        only.push(just_dev.next().await.unwrap().action);
    }
    assert_eq!(
        only,
        [
            A::Created,
            A::Booting,
            A::Running,
            A::Stopping,
            A::Stopped,
            A::Deleted
        ]
    );
    assert_eq!(root.next().await.unwrap().action, A::Created);
    // Another user sees none of it.
    let nothing = tokio::time::timeout(Duration::from_millis(200), theirs.next()).await;
    assert!(nothing.is_err(), "a stranger saw {nothing:?}");
}

#[tokio::test]
async fn an_autostart_machine_that_died_boots_again_but_not_one_that_powered_off() {
    use crate::core::ports::Death;
    let f = fixture();
    let mut req = CreateRequest {
        image: "busybox".into(),
        name: Some("auto".into()),
        home_mount: Some(container_api::machine::HomeMount::None),
        autostart: true,
        ..Default::default()
    };
    machine(&f.core, &NOBODY, Request::MachineCreate(req.clone()))
        .await
        .unwrap();
    req.name = Some("plain".into());
    req.autostart = false;
    machine(&f.core, &NOBODY, Request::MachineCreate(req))
        .await
        .unwrap();
    let died = |name: &str, clean| Death {
        name: name.into(),
        clean,
    };
    // Killed: booted again after the back-off.
    f.vms.guest_goes_down("auto");
    f.core.after_death(died("auto", false)).await;
    assert_eq!(f.vms.state("auto"), MachineState::Running);
    // Powered off from inside, or not autostart: left stopped.
    f.vms.guest_goes_down("auto");
    f.core.after_death(died("auto", true)).await;
    assert_eq!(f.vms.state("auto"), MachineState::Stopped);
    f.vms.guest_goes_down("plain");
    f.core.after_death(died("plain", false)).await;
    assert_eq!(f.vms.state("plain"), MachineState::Stopped);
    // A stop asked during the back-off wins.
    f.core
        .handle(&NOBODY, Request::MachineStart("auto".into()))
        .await
        .unwrap();
    f.vms.guest_goes_down("auto");
    let core = f.core.clone();
    let after = tokio::spawn(async move { core.after_death(died("auto", false)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    f.core
        .handle(
            &NOBODY,
            Request::MachineStop("auto".into(), StopRequest::default()),
        )
        .await
        .unwrap();
    after.await.unwrap();
    assert_eq!(f.vms.state("auto"), MachineState::Stopped);
    // `set autostart=off` needs no restart.
    let reply = f
        .core
        .handle(
            &NOBODY,
            Request::MachineSet {
                name: "auto".into(),
                settings: container_api::machine::SetRequest {
                    autostart: Some(false),
                    ..Default::default()
                },
            },
        )
        .await
        .unwrap();
    let Reply::Set(set) = reply else { panic!() };
    assert!(!set.machine.autostart);
}

#[tokio::test]
async fn stats_show_running_machines_with_a_cpu_rate_and_named_ones_whatever_their_state() {
    let f = fixture();
    for name in ["up", "down"] {
        machine(&f.core, &ROOT, create("busybox", Some(name)))
            .await
            .unwrap();
    }
    f.core
        .handle(&ROOT, Request::MachineStart("up".into()))
        .await
        .unwrap();
    let running = stats(&f.core, &ROOT, &[], false).await.unwrap();
    assert_eq!(running.len(), 1, "only running machines by default");
    let up = &running[0];
    assert_eq!((up.id.as_str(), up.status), ("up", MachineState::Running));
    assert_eq!(
        up.cpu_percent,
        Some(12.5),
        "a first sample is taken again for a rate"
    );
    assert_eq!(up.host_memory.as_ref().unwrap().pss, 200 << 20);
    assert_eq!(up.disk.allocated, 4096);
    let every = stats(&f.core, &ROOT, &[], true).await.unwrap();
    assert_eq!(every.len(), 2);
    let down = &stats(&f.core, &ROOT, &["down"], false).await.unwrap()[0];
    assert_eq!(down.status, MachineState::Stopped);
    assert!(down.host_memory.is_none() && down.cpu_percent.is_none());
    let inspected = machine(&f.core, &ROOT, Request::MachineInspect("up".into()))
        .await
        .unwrap();
    assert!(
        inspected.stats.unwrap().host_memory.is_some(),
        "inspect carries the figures"
    );
}

#[tokio::test]
async fn another_users_machines_have_no_stats_for_you() {
    let f = fixture();
    machine(&f.core, &ROOT, create("busybox", Some("mine")))
        .await
        .unwrap();
    f.core
        .handle(&ROOT, Request::MachineStart("mine".into()))
        .await
        .unwrap();
    assert!(stats(&f.core, &NOBODY, &[], true).await.unwrap().is_empty());
    let e = stats(&f.core, &NOBODY, &["mine"], false).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
}

#[tokio::test]
async fn a_machine_forwards_its_ports_from_boot_and_forward_ports_off_applies_at_once() {
    let f = fixture();
    let req = CreateRequest {
        image: "busybox".into(),
        name: Some("web".into()),
        home_mount: Some(container_api::machine::HomeMount::None),
        publish: vec!["9000:80".parse().unwrap()],
        ..Default::default()
    };
    let m = machine(&f.core, &NOBODY, Request::MachineCreate(req))
        .await
        .unwrap();
    assert!(m.forward_ports, "on by default");
    assert_eq!(m.publish, ["9000:80".parse().unwrap()]);
    let forwards = || -> Vec<String> {
        f.vms
            .calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.starts_with("forward_ports"))
            .cloned()
            .collect()
    };
    assert_eq!(
        forwards(),
        ["forward_ports web watch=true publish=[\"9000:80\"]"]
    );
    let set = |on| Request::MachineSet {
        name: "web".into(),
        settings: container_api::machine::SetRequest {
            forward_ports: Some(on),
            ..Default::default()
        },
    };
    let Reply::Set(reply) = f.core.handle(&NOBODY, set(false)).await.unwrap() else {
        panic!()
    };
    assert!(!reply.takes_effect_at_next_start, "no restart needed");
    assert!(!reply.machine.pending_restart);
    assert!(!reply.machine.forward_ports);
    // The published port stays; the listening ones are no longer followed.
    assert_eq!(
        forwards().last().unwrap(),
        "forward_ports web watch=false publish=[\"9000:80\"]"
    );
    // Another user sees no ports of it.
    let other = Caller {
        uid: 1000,
        gid: 1000,
        pid: None,
    };
    let err = f
        .core
        .handle(&other, Request::MachinePorts("web".into()))
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::NotFound);
    // Two host ports published once each.
    let twice = CreateRequest {
        image: "busybox".into(),
        name: Some("twice".into()),
        no_boot: true,
        publish: vec!["9000:80".parse().unwrap(), "9000:81".parse().unwrap()],
        ..Default::default()
    };
    let err = machine(&f.core, &NOBODY, Request::MachineCreate(twice))
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidArgument);
    assert!(err.message.contains("published twice"), "{}", err.message);
    // The same number over TCP and over UDP is two host ports.
    let both = CreateRequest {
        image: "busybox".into(),
        name: Some("both".into()),
        no_boot: true,
        publish: vec!["9000:80/udp".parse().unwrap(), "9000:80".parse().unwrap()],
        ..Default::default()
    };
    let created = machine(&f.core, &NOBODY, Request::MachineCreate(both))
        .await
        .unwrap();
    let shown: Vec<String> = created.publish.iter().map(|p| p.to_string()).collect();
    assert_eq!(shown, ["9000:80", "9000:80/udp"]);
}

#[tokio::test]
async fn a_commit_reads_only_your_machine_and_names_the_image_in_your_namespace() {
    let f = fixture();
    machine(&f.core, &ROOT, create("busybox", Some("rootbox")))
        .await
        .unwrap();
    let commit = |image: &str| Request::MachineCommit {
        name: "rootbox".into(),
        image: image.into(),
    };
    let e = f.core.handle(&NOBODY, commit("x:1")).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound, "{e:?}");
    assert!(f.images.calls().iter().all(|c| !c.starts_with("commit")));

    f.core.handle(&ROOT, commit("dev:1")).await.unwrap();
    let calls = f.images.calls();
    let made = calls.iter().find(|c| c.starts_with("commit")).unwrap();
    assert!(
        made.starts_with("commit User(0) dev:1 from sha256:busybox"),
        "{made}"
    );
    assert!(
        made.contains(r#""org.container.machine.source": "rootbox""#),
        "{made}"
    );
    // The machine was booted to be read, and the whole tar reached the store.
    assert!(made.ends_with(" 4"), "{made}");
}
