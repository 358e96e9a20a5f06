//! Test fixtures: OCI image layouts built here from hand-made layers, a real `docker-registry`
//! on a free loopback port, `skopeo` to push, `debugfs` to look inside base disks.
#![allow(dead_code)]

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// Whether `tool` can run; when it cannot, skips with a reason, or fails under CI.
pub use container_testkit::have;

/// Runs a command, failing the test with its output unless it succeeds.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `debugfs -R REQUEST DISK` output (stdout and stderr: debugfs reports some things on both).
pub fn debugfs(disk: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(request)
        .arg(disk)
        .output()
        .expect("debugfs runs");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// One tar entry of a hand-made layer.
pub enum E<'a> {
    Dir(&'a str, u32),
    File(&'a str, u32, &'a [u8]),
    /// A file with an owner.
    Owned(&'a str, u32, u64, &'a [u8]),
    /// A file with one extended attribute, carried as a PAX `SCHILY.xattr.` record.
    Xattr(&'a str, &'a str, &'a [u8]),
    Symlink(&'a str, &'a str),
    Hardlink(&'a str, &'a str),
    Char(&'a str, u32, u32),
    Fifo(&'a str),
}

/// An uncompressed layer tar.
pub fn layer(entries: &[E<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_ustar();
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(0);
        let (name, data): (&str, &[u8]) = match e {
            E::Dir(n, m) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*m);
                (n, b"")
            }
            E::File(n, m, d) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*m);
                h.set_size(d.len() as u64);
                (n, d)
            }
            E::Owned(n, m, id, d) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*m);
                h.set_uid(*id);
                h.set_gid(*id);
                h.set_size(d.len() as u64);
                (n, d)
            }
            E::Xattr(n, key, value) => {
                b.append_pax_extensions([(format!("SCHILY.xattr.{key}").as_str(), *value)])
                    .unwrap();
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                (n, b"")
            }
            E::Symlink(n, t) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_link_name(t).unwrap();
                (n, b"")
            }
            E::Hardlink(n, t) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_mode(0o755);
                h.set_link_name(t).unwrap();
                (n, b"")
            }
            E::Char(n, major, minor) => {
                h.set_entry_type(tar::EntryType::Char);
                h.set_mode(0o666);
                h.set_device_major(*major).unwrap();
                h.set_device_minor(*minor).unwrap();
                (n, b"")
            }
            E::Fifo(n) => {
                h.set_entry_type(tar::EntryType::Fifo);
                h.set_mode(0o600);
                (n, b"")
            }
        };
        h.set_path(name).unwrap();
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

/// How a layer is compressed in the image.
#[derive(Clone, Copy, Debug)]
pub enum Comp {
    None,
    Gzip,
    Zstd,
}

pub fn compress(tar: &[u8], comp: Comp) -> Vec<u8> {
    match comp {
        Comp::None => tar.to_vec(),
        Comp::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(tar).unwrap();
            e.finish().unwrap()
        }
        Comp::Zstd => zstd::encode_all(tar, 3).unwrap(),
    }
}

pub fn media_type(comp: Comp) -> &'static str {
    match comp {
        Comp::None => "application/vnd.oci.image.layer.v1.tar",
        Comp::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
        Comp::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
    }
}

/// An OCI image layout being written.
pub struct Layout {
    pub dir: PathBuf,
    manifests: Vec<serde_json::Value>,
}

impl Layout {
    pub fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Self {
            dir: dir.to_path_buf(),
            manifests: Vec::new(),
        }
    }

    /// Adds a blob; returns its descriptor.
    pub fn blob(&self, media_type: &str, bytes: &[u8]) -> serde_json::Value {
        let digest = sha256(bytes);
        std::fs::write(
            self.dir
                .join("blobs/sha256")
                .join(digest.trim_start_matches("sha256:")),
            bytes,
        )
        .unwrap();
        serde_json::json!({"mediaType": media_type, "digest": digest, "size": bytes.len()})
    }

    /// Adds an image (its blobs and manifest); returns the manifest's descriptor.
    pub fn image(
        &self,
        arch: &str,
        config: serde_json::Value,
        layers: &[(Vec<u8>, Comp)],
    ) -> serde_json::Value {
        let layer_descs: Vec<_> = layers
            .iter()
            .map(|(tar, comp)| self.blob(media_type(*comp), &compress(tar, *comp)))
            .collect();
        let diff_ids: Vec<_> = layers.iter().map(|(tar, _)| sha256(tar)).collect();
        let config = serde_json::json!({
            "architecture": arch,
            "os": "linux",
            "created": "2024-01-02T03:04:05Z",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        let config = self.blob(
            "application/vnd.oci.image.config.v1+json",
            &serde_json::to_vec(&config).unwrap(),
        );
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config,
            "layers": layer_descs,
        });
        let mut d = self.blob(
            "application/vnd.oci.image.manifest.v1+json",
            &serde_json::to_vec(&manifest).unwrap(),
        );
        d["platform"] = serde_json::json!({"architecture": arch, "os": "linux"});
        d
    }

    /// Adds an image whose layer blobs are given as stored (possibly broken on purpose).
    pub fn raw_image(&self, layers: &[(&str, Vec<u8>)]) -> serde_json::Value {
        let layer_descs: Vec<_> = layers.iter().map(|(mt, b)| self.blob(mt, b)).collect();
        let config = serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": []},
        });
        let config = self.blob(
            "application/vnd.oci.image.config.v1+json",
            &serde_json::to_vec(&config).unwrap(),
        );
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config,
            "layers": layer_descs,
        });
        self.blob(
            "application/vnd.oci.image.manifest.v1+json",
            &serde_json::to_vec(&manifest).unwrap(),
        )
    }

    /// Adds an image index over manifests; returns its descriptor.
    pub fn index(&self, manifests: &[serde_json::Value]) -> serde_json::Value {
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        });
        self.blob(
            "application/vnd.oci.image.index.v1+json",
            &serde_json::to_vec(&index).unwrap(),
        )
    }

    /// Names a manifest or index `tag` in index.json.
    pub fn tag(&mut self, mut descriptor: serde_json::Value, tag: &str) -> &mut Self {
        descriptor["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": tag});
        self.manifests.push(descriptor);
        let index = serde_json::json!({"schemaVersion": 2, "manifests": self.manifests});
        std::fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec(&index).unwrap(),
        )
        .unwrap();
        self
    }

    /// The layout as a tar archive (what `image load` reads).
    pub fn archive(&self) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        b.append_dir_all(".", &self.dir).unwrap();
        b.into_inner().unwrap()
    }
}

/// A small bootable-looking image: busybox as /sbin/init, plus one of every kind of entry.
pub fn busybox_layers() -> Vec<(Vec<u8>, Comp)> {
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static is installed");
    let base = layer(&[
        E::Dir("bin", 0o755),
        E::Dir("sbin", 0o755),
        E::Dir("etc", 0o755),
        E::Dir("dev", 0o755),
        E::Dir("tmp", 0o1777),
        E::Dir("usr", 0o755),
        E::Dir("usr/bin", 0o755),
        E::Dir("opt", 0o755),
        E::Dir("opt/old", 0o755),
        E::Dir("home", 0o755),
        E::File("bin/busybox", 0o755, &busybox),
        E::Hardlink("bin/sh", "bin/busybox"),
        E::Symlink("sbin/init", "/bin/busybox"),
        E::File("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n"),
        E::File("etc/motd", 0o644, b"lower layer\n"),
        E::File("usr/bin/su", 0o4755, b"#!/bin/sh\n"),
        E::Owned("home/file", 0o600, 1234, b"mine\n"),
        E::Xattr("etc/labelled", "user.test", b"hello"),
        E::Char("dev/null", 1, 3),
        E::Fifo("dev/pipe"),
        E::File("opt/old/gone", 0o644, b"hidden by the opaque dir\n"),
    ]);
    let upper = layer(&[
        E::File("etc/.wh.motd", 0o644, b""),
        E::File("opt/old/.wh..wh..opq", 0o644, b""),
        E::File("opt/old/new", 0o644, b"upper\n"),
        E::File("etc/hostname", 0o644, b"busybox\n"),
    ]);
    let top = layer(&[E::File("etc/top", 0o644, b"third layer, uncompressed\n")]);
    vec![(base, Comp::Gzip), (upper, Comp::Zstd), (top, Comp::None)]
}

/// The config object of the test images.
pub fn busybox_config() -> serde_json::Value {
    serde_json::json!({"Cmd": ["/sbin/init"], "StopSignal": "SIGPWR"})
}

/// What most registry tests start from: the busybox test image ([`busybox_layers`]) tagged
/// `1` in a layout at `work/layout`, pushed to `registry` as `name` (with `creds` as
/// `user:password`). Returns the layout and the pushed reference.
pub fn push_busybox(
    work: &Path,
    registry: &Registry,
    name: &str,
    creds: Option<&str>,
) -> (Layout, String) {
    let mut layout = Layout::new(&work.join("layout"));
    let m = layout.image("amd64", busybox_config(), &busybox_layers());
    layout.tag(m, "1");
    let reference = registry.push(&layout.dir, "1", name, creds);
    (layout, reference)
}

/// An htpasswd file in `dir` that lets `user` in with `password`.
pub fn htpasswd(dir: &Path, user: &str, password: &str) -> PathBuf {
    let path = dir.join("htpasswd");
    let line = run(Command::new("htpasswd").args(["-Bbn", user, password]));
    std::fs::write(&path, line).unwrap();
    path
}

/// A `docker-registry` on a free loopback port, killed on drop.
pub struct Registry {
    pub addr: String,
    pub storage: PathBuf,
    process: Process,
    dir: tempfile::TempDir,
}

/// How the registry runs: a child of the test, or under `scripts/test-registry.sh` (which
/// also runs the token server of `--token`).
enum Process {
    Child(Child),
    Script,
}

/// `scripts/test-registry.sh`.
fn registry_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/test-registry.sh")
}

impl Registry {
    /// Starts a registry; with `htpasswd`, it requires basic auth.
    pub fn start(htpasswd: Option<&Path>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let storage = dir.path().join("data");
        let mut config = format!(
            "version: 0.1\nlog: {{level: info}}\nstorage: {{filesystem: {{rootdirectory: {}}}}}\nhttp: {{addr: {addr}}}\n",
            storage.display()
        );
        if let Some(h) = htpasswd {
            config.push_str(&format!(
                "auth: {{htpasswd: {{realm: test, path: {}}}}}\n",
                h.display()
            ));
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("docker-registry starts");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(&addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "the registry did not listen: {}",
                std::fs::read_to_string(dir.path().join("registry.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            addr,
            storage,
            process: Process::Child(child),
            dir,
        }
    }

    /// Starts a registry that wants bearer tokens from the token server of
    /// `scripts/test-registry.sh --token`; with `htpasswd`, that server wants those basic
    /// credentials (and gives anonymous callers a token granting nothing).
    pub fn start_token(htpasswd: Option<&Path>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(registry_script());
        cmd.arg("start").arg(dir.path()).arg("--token");
        if let Some(h) = htpasswd {
            cmd.arg("--htpasswd").arg(h);
        }
        let addr = run(&mut cmd).trim().to_string();
        Self {
            addr,
            storage: dir.path().join("data"),
            process: Process::Script,
            dir,
        }
    }

    /// The registry's log, with one access line per request.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Makes the registry serve `bytes` as a manifest of repository `name` (by digest, and
    /// as `tag` if given), written straight into its storage, so it can serve what no client
    /// would push (distribution itself serves no manifest over 4 MiB: see [`FakeRegistry`]).
    /// The repository must exist (push to it first). Returns the manifest's digest.
    pub fn plant_manifest(&self, name: &str, tag: Option<&str>, bytes: &[u8]) -> String {
        let digest = sha256(bytes);
        let hex = digest.trim_start_matches("sha256:");
        let write = |path: PathBuf, content: &[u8]| {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, content).unwrap();
        };
        let v2 = self.storage.join("docker/registry/v2");
        write(
            v2.join("blobs/sha256")
                .join(&hex[..2])
                .join(hex)
                .join("data"),
            bytes,
        );
        let manifests = v2.join("repositories").join(name).join("_manifests");
        let link = digest.as_bytes();
        write(
            manifests.join("revisions/sha256").join(hex).join("link"),
            link,
        );
        if let Some(tag) = tag {
            let tag_dir = manifests.join("tags").join(tag);
            write(tag_dir.join("current/link"), link);
            write(tag_dir.join("index/sha256").join(hex).join("link"), link);
        }
        digest
    }

    /// Makes the registry serve `bytes` as a blob of repository `name`, written straight into
    /// its storage (see [`Registry::plant_manifest`]). Returns its digest.
    pub fn plant_blob(&self, name: &str, bytes: &[u8]) -> String {
        let digest = sha256(bytes);
        let hex = digest.trim_start_matches("sha256:");
        let v2 = self.storage.join("docker/registry/v2");
        let data = v2
            .join("blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data");
        std::fs::create_dir_all(data.parent().unwrap()).unwrap();
        std::fs::write(data, bytes).unwrap();
        let link = v2
            .join("repositories")
            .join(name)
            .join("_layers/sha256")
            .join(hex)
            .join("link");
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        std::fs::write(link, digest.as_bytes()).unwrap();
        digest
    }

    /// What the token server logged: one line per token issued or refused.
    pub fn token_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("token.log")).unwrap_or_default()
    }

    /// Pushes `layout:tag` as `name:tag` with skopeo; `creds` as `user:password`.
    pub fn push(&self, layout: &Path, tag: &str, name: &str, creds: Option<&str>) -> String {
        let reference = format!("{}/{name}", self.addr);
        let mut cmd = Command::new("skopeo");
        cmd.args([
            "copy",
            "-q",
            "--multi-arch",
            "all",
            "--dest-tls-verify=false",
        ]);
        if let Some(c) = creds {
            cmd.args(["--dest-creds", c]);
        }
        cmd.arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{reference}"));
        run(&mut cmd);
        reference
    }

    /// Pushes `layout:tag` as `name:tag` converted to a Docker v2 schema 2 manifest.
    pub fn push_as_docker(&self, layout: &Path, tag: &str, name: &str) -> String {
        let reference = format!("{}/{name}", self.addr);
        run(Command::new("skopeo")
            .args(["copy", "-q", "--format", "v2s2", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{reference}")));
        reference
    }

    /// The file holding a blob in the registry's storage.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        match &mut self.process {
            Process::Child(child) => {
                let _ = child.kill();
                let _ = child.wait();
            }
            Process::Script => {
                let _ = Command::new(registry_script())
                    .arg("stop")
                    .arg(self.dir.path())
                    .output();
            }
        }
    }
}

/// Files directly under `dir` (empty when it does not exist).
pub fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A registry that serves fixed manifests by path (`/v2/NAME/manifests/REF`) with their
/// digest header, and nothing else: for what a real registry would not serve, such as a
/// manifest over distribution's 4 MiB limit. One request per connection.
pub struct FakeRegistry {
    pub addr: String,
}

impl FakeRegistry {
    /// Serves each `(path, media type, body)`.
    pub fn serve(manifests: Vec<(String, String, Vec<u8>)>) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let manifests = std::sync::Arc::new(manifests);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let manifests = manifests.clone();
                std::thread::spawn(move || Self::answer(stream, &manifests));
            }
        });
        Self { addr }
    }

    fn answer(mut stream: TcpStream, manifests: &[(String, String, Vec<u8>)]) {
        use std::io::Read;
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => request.extend_from_slice(&buf[..n]),
            }
        }
        let text = String::from_utf8_lossy(&request);
        let mut line = text.lines().next().unwrap_or("").split(' ');
        let (method, path) = (line.next().unwrap_or(""), line.next().unwrap_or(""));
        let found = manifests.iter().find(|(p, _, _)| p == path);
        let (status, media, body): (&str, &str, &[u8]) = match (path, found) {
            ("/v2/", _) => ("200 OK", "application/json", b"{}"),
            (_, Some((_, media, body))) => ("200 OK", media, body),
            _ => (
                "404 Not Found",
                "application/json",
                br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#,
            ),
        };
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {media}\r\nContent-Length: {}\r\n\
             Docker-Content-Digest: {}\r\nConnection: close\r\n\r\n",
            body.len(),
            sha256(body)
        );
        let _ = stream.write_all(head.as_bytes());
        if method != "HEAD" {
            let _ = stream.write_all(body);
        }
    }
}

/// Root's own namespace: where the tests that are not about namespaces keep their names.
#[allow(dead_code)]
pub const ROOT: container_image::Namespace = container_image::Namespace::User(0);
