//! The shared home, end to end, as a regular user on a Debian machine with git and sqlite3
//! (the `devtools` test image): a host edit's contents are what the guest reads at its next
//! open, and names, sizes and modes follow within virtiofsd's 1 s (`--cache auto`: in-place
//! edits, an editor's atomic save, new and deleted files); what the guest writes the host
//! reads at once; SQLite databases (WAL mode too, which maps its index shared) and git
//! repositories used from both sides, one side at a time (locks stay inside the guest).
//! One machine serves every step, in the order a user would meet them. `--cache always`
//! fails it (the editor's save), and so does `--cache never` (WAL).
//!
//! `CONTAINER_TEST_VIRTIOFSD_ARGS` (space-separated) adds `[runtime] virtiofsd-args` to the
//! service's config, to check a candidate virtiofsd option set (bench/home-share.sh) against
//! these tests before it becomes the default.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use container_e2e::{Registry, Service, TestUser, is_root, kernel_config, require, run_ok};

fn config() -> String {
    let extra = std::env::var("CONTAINER_TEST_VIRTIOFSD_ARGS").unwrap_or_default();
    let args: Vec<String> = extra.split_whitespace().map(|a| format!("{a:?}")).collect();
    format!(
        "[machine]\ncpus = 2\nmemory = \"1G\"\n[runtime]\nvirtiofsd-args = [{}]\n{}",
        args.join(", "),
        kernel_config()
    )
}

/// The user, the machine and a directory of the user's home, seen from both sides.
struct Shared<'a> {
    user: &'a TestUser,
    service: &'a Service,
    machine: &'a str,
    dir: PathBuf,
}

impl Shared<'_> {
    /// Runs `script` with `sh -ec` on the host as the user, in the shared directory.
    fn host(&self, script: &str) -> String {
        run_ok(
            Command::new("runuser")
                .args(["-u", &self.user.name, "--", "sh", "-ec", script])
                .current_dir(&self.dir)
                .env("HOME", &self.user.home),
        )
    }

    /// Runs `script` with `sh -ec` in the guest as the user, in the same directory.
    fn guest(&self, script: &str) -> String {
        self.user.cli_ok_in(
            self.service,
            &self.dir,
            &[
                "machine",
                "run",
                "-n",
                self.machine,
                "--no-shell",
                "sh",
                "-ec",
                script,
            ],
        )
    }

    /// Runs `host`, waits out the guest's metadata window, then runs `guest`.
    fn guest_after_window(&self, host: &str, guest: &str) -> String {
        self.host(host);
        std::thread::sleep(METADATA_WINDOW);
        self.guest(guest)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

#[test]
fn the_shared_home_is_coherent_with_the_host() {
    if !require(is_root(), "the service runs as root") {
        return;
    }
    let registry = Registry::start();
    let image = registry.push(&container_e2e::test_image("devtools"), "tests/devtools:12");
    let service = Service::start(&config());
    let user = TestUser::ensure("ctshare", 1520);
    let dir = user.home.join("share-test");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    nix::unistd::chown(&dir, Some(user.uid.into()), Some(user.gid.into())).unwrap();
    user.cli_ok(
        &service,
        &["machine", "create", &image, "--name", "share", "--wait"],
    );
    let s = Shared {
        user: &user,
        service: &service,
        machine: "share",
        dir: dir.clone(),
    };

    host_edits_are_seen_by_the_guests_next_read(&s);
    guest_writes_are_seen_by_the_host_at_once(&s);
    sqlite_works_from_both_sides(&s);
    git_works_from_both_sides(&s);

    std::fs::remove_dir_all(&dir).unwrap();
}

/// How long the guest may keep what it learnt of a name or of a file's attributes (size,
/// mode, whether it exists) after the host changed it: virtiofsd's `--cache auto` timeout.
/// File contents have no such window (below).
const METADATA_WINDOW: Duration = Duration::from_millis(1100);

fn host_edits_are_seen_by_the_guests_next_read(s: &Shared) {
    s.host("printf 'first version\\n' > notes.txt");
    assert_eq!(s.guest("cat notes.txt"), "first version\n");
    // The guest read it, so its pages are cached; an in-place edit of the same size is
    // read at once at the next open, never from those pages.
    s.host("printf 'other version\\n' > notes.txt");
    assert_eq!(s.guest("cat notes.txt"), "other version\n");
    s.host("printf 'third version\\n' > notes.txt");
    assert_eq!(s.guest("cat notes.txt"), "third version\n");

    // Sizes, names and modes within the metadata window.
    assert_eq!(
        s.guest_after_window(
            "printf 'second, and longer than the first\\n' > notes.txt",
            "cat notes.txt"
        ),
        "second, and longer than the first\n"
    );
    assert_eq!(
        s.guest_after_window("printf 'appended\\n' >> notes.txt", "cat notes.txt"),
        "second, and longer than the first\nappended\n"
    );
    assert_eq!(
        s.guest_after_window(
            "printf 'short\\n' > notes.txt",
            "cat notes.txt; stat -c %s notes.txt"
        ),
        "short\n6\n"
    );
    // An editor's atomic save: a new file renamed over the old one (a new inode).
    assert_eq!(
        s.guest_after_window(
            "printf 'saved by an editor\\n' > .notes.txt.swp && mv .notes.txt.swp notes.txt",
            "cat notes.txt"
        ),
        "saved by an editor\n"
    );
    // Files the host creates and deletes appear and disappear; a name the guest never saw
    // appears at once.
    s.host("printf 'new\\n' > created.txt");
    assert_eq!(s.guest("cat created.txt"), "new\n");
    assert_eq!(
        s.guest_after_window(
            "rm created.txt",
            "test -e created.txt && echo present || echo gone"
        ),
        "gone\n"
    );
    // Mode changes, with the host's owner.
    assert_eq!(
        s.guest_after_window("chmod 640 notes.txt", "stat -c '%U %a' notes.txt"),
        format!("{} 640\n", s.user.name)
    );
}

fn guest_writes_are_seen_by_the_host_at_once(s: &Shared) {
    s.guest("printf 'from the guest\\n' > guest.txt");
    assert_eq!(
        std::fs::read_to_string(s.path("guest.txt")).unwrap(),
        "from the guest\n"
    );
    // Owned by the user on the host too: the share is served as its owner.
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(s.path("guest.txt")).unwrap().uid(),
        s.user.uid
    );
    s.guest("printf 'again\\n' >> guest.txt");
    assert_eq!(
        std::fs::read_to_string(s.path("guest.txt")).unwrap(),
        "from the guest\nagain\n"
    );
    // A large write is whole on the host when the guest's command returns.
    s.guest("head -c 3000000 /dev/zero | tr '\\0' x > big.txt");
    assert_eq!(
        std::fs::metadata(s.path("big.txt")).unwrap().len(),
        3_000_000
    );
}

fn sqlite_works_from_both_sides(s: &Shared) {
    // One side at a time: the guest's locks do not reach the host (virtiofsd does not
    // offer POSIX locks, so the guest kernel keeps them), and the guest learns the size the
    // host's writes gave the file within the metadata window.
    s.host("sqlite3 app.db \"create table t(who text); insert into t values ('host')\"");
    std::thread::sleep(METADATA_WINDOW);
    s.guest("sqlite3 app.db \"insert into t values ('guest')\"");
    assert_eq!(
        s.host("sqlite3 app.db 'select who from t order by rowid'"),
        "host\nguest\n"
    );
    s.host("sqlite3 app.db \"insert into t values ('host again')\"");
    std::thread::sleep(METADATA_WINDOW);
    assert_eq!(
        s.guest("sqlite3 app.db 'select count(*) from t; pragma integrity_check'"),
        "3\nok\n"
    );

    // In the guest, a second writer waits for the first: while one connection holds a write transaction,
    // another that will not wait is told the database is locked, and the write it retries
    // afterwards lands.
    let out = s.guest(
        "(echo \"begin exclusive; insert into t values ('first');\"; sleep 4; echo 'commit;') \
           | sqlite3 app.db &
         sleep 2
         if sqlite3 app.db \"insert into t values ('second')\" 2>err.txt; then echo not-locked; \
           else cat err.txt; fi
         wait
         sqlite3 app.db \"insert into t values ('second')\"
         sqlite3 app.db 'select who from t where rowid > 3 order by rowid'",
    );
    assert!(out.contains("database is locked"), "{out}");
    assert!(out.ends_with("first\nsecond\n"), "{out}");

    // WAL mode maps the `-shm` index shared (MAP_SHARED): it must work on the share.
    let out = s.guest(
        "sqlite3 wal.db 'pragma journal_mode=wal; create table k(v); insert into k values (1), (2)'
         sqlite3 wal.db 'insert into k values (3); select sum(v) from k'",
    );
    assert_eq!(out, "wal\n6\n");
    assert_eq!(
        s.host("sqlite3 wal.db 'select sum(v) from k; pragma integrity_check'"),
        "6\nok\n"
    );
    s.host("sqlite3 wal.db 'insert into k values (4)'");
    std::thread::sleep(METADATA_WINDOW);
    assert_eq!(s.guest("sqlite3 wal.db 'select sum(v) from k'"), "10\n");
}

fn git_works_from_both_sides(s: &Shared) {
    let git = "git -c user.name=Test -c user.email=test@example.invalid";
    s.host(&format!(
        "git init -q -b main repo && cd repo && printf 'hello\\n' > README && \
         {git} add README && {git} commit -qm 'from the host'"
    ));
    std::thread::sleep(METADATA_WINDOW);
    assert_eq!(
        s.guest("cd repo && git log --format=%s && git status --porcelain"),
        "from the host\n"
    );
    // The host edits a tracked file: the guest's status shows it, and its commit
    // records the host's new content.
    s.host("printf 'hello, edited on the host\\n' > repo/README");
    std::thread::sleep(METADATA_WINDOW);
    assert_eq!(s.guest("cd repo && git status --porcelain"), " M README\n");
    s.guest(&format!(
        "cd repo && {git} commit -qam 'from the guest' && printf 'guest file\\n' > NEW && \
         {git} add NEW && {git} commit -qm 'added in the guest'"
    ));
    assert_eq!(
        s.host("cd repo && git log --format=%s && git status --porcelain"),
        "added in the guest\nfrom the guest\nfrom the host\n"
    );
    assert_eq!(
        s.host("cd repo && git show HEAD~1:README"),
        "hello, edited on the host\n"
    );
    // And back: a host commit (which rewrites the index and refs by rename) is what the
    // guest's git sees next.
    s.host(&format!(
        "cd repo && git rm -q NEW && {git} commit -qm 'removed on the host'"
    ));
    std::thread::sleep(METADATA_WINDOW);
    assert_eq!(
        s.guest("cd repo && git log -1 --format=%s && git status --porcelain && ls"),
        "removed on the host\nREADME\n"
    );
    assert_eq!(s.guest("cd repo && git fsck --no-progress 2>&1"), "");
}
