//! The agent in a real VM (QEMU microvm under TCG, the distribution's cloud kernel, a
//! busybox machine): boot and readiness, the hand-over to the image's init, first-boot user
//! setup, disk growth, a share, the network config, exec in all its forms, copies, clock and
//! a clean shutdown through busybox init. Needs root, qemu, qemu-img, busybox, mkfs.ext4 and
//! the vhost-user helpers; skips without them (fails in CI).

mod common;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use container_agent_proto::client::{AgentClient, ExecEvent, ExecOutput, ExitStatus, wait_ready};
use container_agent_proto::{ExecRequest, PORT, ProtoError};

fn req(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec!["PATH=/bin:/sbin".into(), "HOME=/root".into()],
        cwd: "/".into(),
        ..Default::default()
    }
}

async fn run(uds: &Path, r: ExecRequest, stdin: &[u8]) -> ExecOutput {
    let session = AgentClient::connect(uds, PORT)
        .await
        .expect("connecting to the agent")
        .exec(r)
        .await
        .expect("starting the process");
    session.output(stdin).await.expect("running the process")
}

async fn sh(uds: &Path, script: &str) -> String {
    let out = run(uds, req(&["sh", "-c", script]), b"").await;
    assert_eq!(
        out.status,
        ExitStatus::Code(0),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_agent_runs_a_machine() {
    if !common::prerequisites() {
        return;
    }
    let started = Instant::now();
    let mut vm = common::Vm::boot();
    let uds = vm.vsock.clone();
    let uds = uds.as_path();

    // Ready, then init takes over as PID 1.
    let ready = wait_ready(
        &vm.ready,
        uds,
        PORT,
        Instant::now() + Duration::from_secs(90),
    )
    .await
    .expect("the agent answers");
    let mut init_running = ready.init_running;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !init_running {
        assert!(Instant::now() < deadline, "init never took over PID 1");
        tokio::time::sleep(Duration::from_millis(50)).await;
        init_running = AgentClient::connect(uds, PORT)
            .await
            .unwrap()
            .ping()
            .await
            .unwrap()
            .init_running;
    }
    eprintln!("ready in {:?}", started.elapsed());
    assert_eq!(sh(uds, "cat /proc/1/comm").await, "init\n");
    assert_eq!(sh(uds, "readlink /proc/1/exe").await, "/bin/busybox\n");
    let console = vm.console();
    assert!(
        console.contains("container-agent: starting init /sbin/init"),
        "{console}"
    );
    assert!(
        console.contains("container-agent: root filesystem grown"),
        "{console}"
    );

    // Exec: output, exit codes, signal deaths, separate streams, refusals.
    let out = run(uds, req(&["echo", "hi"]), b"").await;
    assert_eq!(
        (out.stdout.as_slice(), out.status),
        (&b"hi\n"[..], ExitStatus::Code(0))
    );
    assert_eq!(
        run(uds, req(&["sh", "-c", "exit 42"]), b"").await.status,
        ExitStatus::Code(42)
    );
    assert_eq!(
        run(uds, req(&["sh", "-c", "kill -9 $$"]), b"").await.status,
        ExitStatus::Signal(9)
    );
    let out = run(uds, req(&["sh", "-c", "echo out; echo err >&2"]), b"").await;
    assert_eq!(
        (out.stdout.as_slice(), out.stderr.as_slice()),
        (&b"out\n"[..], &b"err\n"[..])
    );
    let mut in_tmp = req(&["pwd"]);
    in_tmp.cwd = "/tmp".into();
    assert_eq!(run(uds, in_tmp, b"").await.stdout, b"/tmp\n");
    let mut login = req(&["sh", "-c", "echo $0"]);
    login.arg0 = Some("-sh".into());
    assert_eq!(run(uds, login, b"").await.stdout, b"-sh\n");
    for (r, code, says) in [
        (req(&["no-such-tool"]), 127, "executable file not found"),
        (req(&["/etc/passwd"]), 126, "permission denied"),
        (
            ExecRequest {
                cwd: "/no/such/dir".into(),
                ..req(&["true"])
            },
            126,
            "/no/such/dir",
        ),
    ] {
        match AgentClient::connect(uds, PORT).await.unwrap().exec(r).await {
            Err(ProtoError::Agent { message, code: c }) => {
                assert_eq!(c, Some(code), "{message}");
                assert!(message.contains(says), "{message}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    // Stdin streams through, in order and whole, bigger than any frame.
    let input: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let out = run(uds, req(&["cat"]), &input).await;
    assert_eq!(out.stdout.len(), input.len());
    assert!(out.stdout == input, "cat returned different bytes");

    // A signal from the host ends a process.
    let session = AgentClient::connect(uds, PORT)
        .await
        .unwrap()
        .exec(req(&["sleep", "60"]))
        .await
        .unwrap();
    let (mut input_half, mut events) = session.split();
    input_half.signal(libc::SIGTERM).await.unwrap();
    assert_eq!(
        events.next().await.unwrap(),
        ExecEvent::Exit(ExitStatus::Signal(libc::SIGTERM))
    );

    // A terminal: the process leads a session on a pty, sees its size and resizes.
    let mut t = req(&["sh", "-c", "tty; stty size"]);
    (t.tty, t.rows, t.cols) = (true, 24, 80);
    let out = run(uds, t, b"").await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("/dev/pts/"), "{text}");
    assert!(text.contains("24 80"), "{text}");
    let mut t = req(&["sh"]);
    (t.tty, t.rows, t.cols) = (true, 24, 80);
    let session = AgentClient::connect(uds, PORT)
        .await
        .unwrap()
        .exec(t)
        .await
        .unwrap();
    let (mut input_half, mut events) = session.split();
    input_half.resize(50, 132).await.unwrap();
    input_half
        .write_stdin(b"stty size; exit 3\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(20), events.next())
            .await
            .unwrap()
            .unwrap()
        {
            ExecEvent::Stdout(b) => seen.extend_from_slice(&b),
            ExecEvent::Stderr(b) => panic!("a tty session has no stderr: {b:?}"),
            ExecEvent::Exit(s) => break s,
        }
    };
    assert_eq!(status, ExitStatus::Code(3));
    assert!(
        String::from_utf8_lossy(&seen).contains("50 132"),
        "{}",
        String::from_utf8_lossy(&seen)
    );

    // A host that goes away ends its processes: a terminal hangs up, a pipe reaches EOF.
    for tty in [true, false] {
        let mut r = req(&["sh"]);
        (r.tty, r.rows, r.cols) = (tty, 24, 80);
        let session = AgentClient::connect(uds, PORT)
            .await
            .unwrap()
            .exec(r)
            .await
            .unwrap();
        let pid = session.pid();
        drop(session);
        let deadline = Instant::now() + Duration::from_secs(10);
        while run(uds, req(&["kill", "-0", &pid.to_string()]), b"")
            .await
            .status
            == ExitStatus::Code(0)
        {
            assert!(
                Instant::now() < deadline,
                "sh (tty: {tty}) outlived its session"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // Twenty at once.
    let runs = (0..20).map(|i| {
        let uds = uds.to_path_buf();
        tokio::spawn(async move {
            let out = run(
                &uds,
                req(&["sh", "-c", &format!("sleep 0.2; echo {i}")]),
                b"",
            )
            .await;
            assert_eq!(out.stdout, format!("{i}\n").into_bytes());
        })
    });
    for r in futures_join(runs).await {
        r.unwrap();
    }

    // The machine: grown disk, share, network, host name, user.
    let df = sh(uds, "df -k / | tail -n 1").await;
    let size_kib: u64 = df.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(
        size_kib * 1024 > common::DISK_BYTES * 8 / 10,
        "root not grown: {df}"
    );
    assert_eq!(
        sh(uds, "cat '/mnt/host share/greeting'").await,
        "hello from the host\n"
    );
    assert!(
        run(uds, req(&["sh", "-c", "echo x > '/mnt/host share/x'"]), b"")
            .await
            .status
            != ExitStatus::Code(0)
    );
    assert!(
        sh(uds, "ip -4 addr show eth0")
            .await
            .contains("inet 10.0.2.15/24")
    );
    assert!(
        sh(uds, "ip route")
            .await
            .contains("default via 10.0.2.2 dev eth0")
    );
    assert!(sh(uds, "ip link show lo").await.contains("UP"));
    assert_eq!(
        sh(uds, "cat /etc/resolv.conf").await,
        "nameserver 10.0.2.3\n"
    );
    assert_eq!(sh(uds, "hostname").await, "agent-test\n");
    assert!(
        sh(uds, "cat /etc/hosts")
            .await
            .starts_with("127.0.0.1 localhost # container\n10.0.2.15 agent-test ")
    );
    assert_eq!(
        sh(uds, "id alice.b").await,
        "uid=1000(alice.b) gid=1000(alice.b) groups=1000(alice.b),10(wheel)\n"
    );
    assert!(!sh(uds, "cat /etc/passwd").await.contains("ubuntu"));
    let as_alice = ExecRequest {
        user: Some("alice.b".into()),
        cwd: "/home/alice.b".into(),
        ..req(&["sh", "-c", "id -u; id -G; cat .profile; stat -c %u:%g ."])
    };
    let out = run(uds, as_alice, b"").await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "1000\n1000 10\n# from skel\n1000:1000\n"
    );

    // Copies: a tree in and out, byte for byte, modes and links kept.
    let src = tempfile::tempdir().unwrap();
    let tree = src.path().join("tree");
    std::fs::create_dir_all(tree.join("sub/deeper")).unwrap();
    std::fs::write(tree.join("a.txt"), "alpha\n").unwrap();
    let blob: Vec<u8> = (0..700_000u32).map(|i| (i * 7 % 256) as u8).collect();
    std::fs::write(tree.join("sub/blob.bin"), &blob).unwrap();
    std::fs::write(tree.join("sub/deeper/run.sh"), "#!/bin/sh\necho ran\n").unwrap();
    std::fs::set_permissions(
        tree.join("sub/deeper/run.sh"),
        std::fs::Permissions::from_mode(0o750),
    )
    .unwrap();
    std::os::unix::fs::symlink("../a.txt", tree.join("sub/link")).unwrap();
    std::fs::write(tree.join("owned"), "mine\n").unwrap();
    std::os::unix::fs::chown(tree.join("owned"), Some(1234), Some(2345)).unwrap();
    let mut archive = tar::Builder::new(Vec::new());
    archive.follow_symlinks(false);
    archive.append_dir_all("tree", &tree).unwrap();
    let archive = archive.into_inner().unwrap();
    AgentClient::connect(uds, PORT)
        .await
        .unwrap()
        .copy_in("/root", archive.as_slice())
        .await
        .unwrap();
    assert_eq!(sh(uds, "/root/tree/sub/deeper/run.sh").await, "ran\n");
    assert_eq!(sh(uds, "cat /root/tree/sub/link").await, "alpha\n");
    assert_eq!(
        sh(uds, "stat -c %u:%g /root/tree/owned").await,
        "1234:2345\n"
    );
    let mut back = Vec::new();
    let mut reader = AgentClient::connect(uds, PORT)
        .await
        .unwrap()
        .copy_out("/root/tree")
        .await
        .unwrap();
    tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut back)
        .await
        .unwrap();
    let dst = tempfile::tempdir().unwrap();
    tar::Archive::new(back.as_slice())
        .unpack(dst.path())
        .unwrap();
    assert_trees_equal(&tree, &dst.path().join("tree"));
    // A single file, renamed on the way in.
    AgentClient::connect(uds, PORT)
        .await
        .unwrap()
        .copy_in("/tmp/renamed.bin", {
            let mut one = tar::Builder::new(Vec::new());
            one.append_path_with_name(tree.join("sub/blob.bin"), "blob.bin")
                .unwrap();
            std::io::Cursor::new(one.into_inner().unwrap())
        })
        .await
        .unwrap();
    assert_eq!(
        sh(uds, "md5sum < /tmp/renamed.bin").await,
        sh(uds, "md5sum < /root/tree/sub/blob.bin").await
    );
    match AgentClient::connect(uds, PORT)
        .await
        .unwrap()
        .copy_out("/no/such/path")
        .await
    {
        Err(ProtoError::Agent { message, .. }) => {
            assert!(message.contains("/no/such/path"), "{message}")
        }
        Err(e) => panic!("expected the agent's refusal, got {e}"),
        Ok(_) => panic!("expected the agent's refusal, got a stream"),
    }

    // The clock.
    AgentClient::connect(uds, PORT)
        .await
        .unwrap()
        .set_time(1_893_456_000_000_000_000)
        .await
        .unwrap();
    assert_eq!(sh(uds, "date -u +%Y").await, "2030\n");

    // A clean stop through busybox init, well before the forced power-off.
    let stop = Instant::now();
    AgentClient::connect(uds, PORT)
        .await
        .unwrap()
        .shutdown(None, Duration::from_secs(60))
        .await
        .unwrap();
    let status = vm
        .wait_exit(Duration::from_secs(30))
        .expect("the machine powered off");
    assert!(status.success(), "qemu: {status}");
    let console = vm.console();
    assert!(
        !console.contains("did not stop the machine in time"),
        "{console}"
    );
    eprintln!(
        "stopped in {:?}; whole test {:?}",
        stop.elapsed(),
        started.elapsed()
    );
    if std::env::var_os("SHOW_CONSOLE").is_some() {
        eprintln!("{console}");
    }
}

#[test]
fn a_failed_boot_says_why_and_powers_off() {
    if !common::prerequisites() {
        return;
    }
    let mut vm = common::Vm::boot_with(|cfg| cfg.modules.push("/modules/missing.ko".into()));
    let status = vm
        .wait_exit(Duration::from_secs(60))
        .expect("the VM powers off instead of hanging");
    assert!(status.success(), "qemu: {status}");
    let console = vm.console();
    assert!(
        console.contains("container-agent: boot failed: opening module /modules/missing.ko: No such file or directory"),
        "{console}"
    );
    assert!(
        console.contains("container-agent: powering off"),
        "{console}"
    );
    assert!(!console.contains("starting init"), "{console}");
}

async fn futures_join<T>(
    tasks: impl Iterator<Item = tokio::task::JoinHandle<T>>,
) -> Vec<Result<T, tokio::task::JoinError>> {
    let mut out = Vec::new();
    for t in tasks.collect::<Vec<_>>() {
        out.push(t.await);
    }
    out
}

/// Same paths, kinds, modes, contents and link targets.
fn assert_trees_equal(a: &Path, b: &Path) {
    let ma = std::fs::symlink_metadata(a).unwrap();
    let mb = std::fs::symlink_metadata(b).unwrap_or_else(|e| panic!("{}: {e}", b.display()));
    assert_eq!(ma.file_type(), mb.file_type(), "{}", b.display());
    if !ma.file_type().is_symlink() {
        assert_eq!(
            ma.permissions().mode(),
            mb.permissions().mode(),
            "{}",
            b.display()
        );
    }
    if ma.is_dir() {
        let names = |d: &Path| {
            let mut v: Vec<_> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names(a), names(b), "{}", b.display());
        for n in names(a) {
            assert_trees_equal(&a.join(&n), &b.join(&n));
        }
    } else if ma.file_type().is_symlink() {
        assert_eq!(
            std::fs::read_link(a).unwrap(),
            std::fs::read_link(b).unwrap()
        );
    } else {
        let mut x = Vec::new();
        let mut y = Vec::new();
        std::fs::File::open(a).unwrap().read_to_end(&mut x).unwrap();
        std::fs::File::open(b).unwrap().read_to_end(&mut y).unwrap();
        assert!(x == y, "{} differs", b.display());
    }
}
