//! What `run` starts in a machine (user, working directory, environment, argv), `run`
//! itself and `cp`.

use std::path::Path;

use container_api::ApiError;
use container_api::machine::{HomeMount, RunRequest};

use super::guest_path;
use crate::core::ports::{ClientStream, ExecSpec, ExecUser, SshAgentForward};
use crate::core::{Caller, Core};
use crate::machines::MachineRecord;

/// The shell a `run` command goes through: every image has it (`$0` there is `/bin/sh`).
const SHELL: &str = "/bin/sh";

impl Core {
    /// Works out what `run` starts: user, working directory, environment, argv.
    pub(in crate::core) fn exec_spec(
        record: &MachineRecord,
        req: &RunRequest,
    ) -> Result<ExecSpec, ApiError> {
        let user = &record.user;
        let (exec_user, groups) = Self::exec_identity(user, req)?;
        let as_machine_user = matches!(&exec_user, ExecUser::Ids { uid, .. } if *uid == user.uid)
            || matches!(&exec_user, ExecUser::Name(n) if *n == user.name);
        let home = if as_machine_user {
            user.home.clone()
        } else if matches!(exec_user, ExecUser::Ids { uid: 0, .. }) {
            "/root".to_string()
        } else {
            "/".to_string()
        };
        let cwd = match &req.workdir {
            Some(w) => guest_path(w).or_else(|_| {
                if w == "/" {
                    Ok("/".to_string())
                } else {
                    Err(ApiError::invalid(format!(
                        "workdir `{w}` must be an absolute path"
                    )))
                }
            })?,
            None => req
                .caller_cwd
                .as_deref()
                .and_then(|cwd| visible_path(record, cwd))
                .unwrap_or_else(|| home.clone()),
        };
        let shell = user.shell.clone();
        let (argv, arg0) = if req.command.is_empty() {
            let base = Path::new(&shell)
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_else(|| "sh".into());
            (vec![shell.clone()], Some(format!("-{base}")))
        } else if req.no_shell {
            (req.command.clone(), None)
        } else {
            // As `ssh host CMD ARGS…` and Apple's `container machine run`: the words are joined
            // and the guest's POSIX shell parses them, so `$VAR`, `&&` and `exit 3` work.
            (
                vec![SHELL.to_string(), "-c".to_string(), req.command.join(" ")],
                None,
            )
        };
        let mut env = vec![
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
            format!("HOME={home}"),
        ];
        if as_machine_user {
            env.push(format!("USER={}", user.name));
            env.push(format!("LOGNAME={}", user.name));
            env.push(format!("SHELL={shell}"));
        }
        if req.tty {
            env.push("TERM=xterm-256color".into());
        }
        // User-given values override the defaults above.
        for e in &req.env {
            let key = e.split('=').next().unwrap_or_default();
            env.retain(|d| d.split('=').next() != Some(key));
            env.push(e.clone());
        }
        Ok(ExecSpec {
            argv,
            arg0,
            env,
            cwd,
            user: exec_user,
            groups,
            tty: req.tty,
            rows: req.rows.unwrap_or(24),
            cols: req.cols.unwrap_or(80),
            detach: req.detach,
            ssh_agent: None,
        })
    }

    /// The SSH agent a `run` forwards: the caller's `SSH_AUTH_SOCK`, connected to as the
    /// caller. Only into the caller's own machine: root running in a user's machine would
    /// otherwise hand its agent to that user.
    fn ssh_agent_forward(
        caller: &Caller,
        record: &MachineRecord,
        req: &RunRequest,
    ) -> Result<Option<SshAgentForward>, ApiError> {
        let Some(path) = &req.ssh_auth_sock else {
            return Ok(None);
        };
        // What fits a socket address (sun_path, NUL included).
        const MAX_SOCKET_PATH: usize = 107;
        if !path.starts_with('/') || path.contains('\0') || path.len() > MAX_SOCKET_PATH {
            return Err(ApiError::invalid(format!(
                "SSH_AUTH_SOCK `{path}` is not an agent socket's path (absolute, at most {MAX_SOCKET_PATH} bytes): fix or unset it"
            )));
        }
        if caller.uid != record.owner_uid {
            tracing::info!(
                uid = caller.uid,
                machine = %record.name,
                "not forwarding the SSH agent of a caller who does not own the machine"
            );
            return Ok(None);
        }
        Ok(Some(SshAgentForward {
            path: path.clone(),
            uid: caller.uid,
            gid: caller.gid,
        }))
    }
}

impl Core {
    /// Who `run` runs as, from `--root`, `-u USER|UID[:GID]`, `--uid` and `--gid`, and the
    /// supplementary groups when they are not the user's own:
    ///
    /// - nothing: the machine's user, `--gid` replacing its primary group;
    /// - `--root`: uid 0, gid 0; `--gid G` adds G as a supplementary group (as Apple's
    ///   `run --root --gid 1000 id -G` prints `0 1000`), since root's primary group stays 0;
    /// - `--uid U` or `-u UID`: that uid, with `--gid`'s group (or the one after the colon) as
    ///   primary, else its passwd entry's (the guest decides);
    /// - `-u NAME`: resolved in the guest.
    ///
    /// Contradictions are refused rather than one flag silently winning: `--root` with `-u` or
    /// `--uid`, `-u` with `--uid`, `-u UID:GID` with a different `--gid`, and a group with a
    /// user name (the guest resolves names, and a name's group would be its own).
    fn exec_identity(
        user: &container_api::machine::MachineUser,
        req: &RunRequest,
    ) -> Result<(ExecUser, Option<Vec<u32>>), ApiError> {
        if req.root && (req.user.is_some() || req.uid.is_some()) {
            return Err(ApiError::invalid(
                "--root runs as uid 0: give it without -u/--user or --uid",
            ));
        }
        if req.user.is_some() && req.uid.is_some() {
            return Err(ApiError::invalid(
                "give the user once: -u/--user or --uid, not both",
            ));
        }
        if req.root {
            return Ok((
                ExecUser::Ids {
                    uid: 0,
                    gid: Some(0),
                },
                req.gid.filter(|g| *g != 0).map(|g| vec![g]),
            ));
        }
        if let Some(u) = &req.user {
            let (who, group) = match u.split_once(':') {
                Some((w, g)) => (w, Some(g)),
                None => (u.as_str(), None),
            };
            let group = group
                .map(|g| {
                    g.parse::<u32>()
                        .map_err(|_| ApiError::invalid(format!("invalid group `{g}` in -u {u}")))
                })
                .transpose()?;
            if let (Some(g), Some(flag)) = (group, req.gid)
                && g != flag
            {
                return Err(ApiError::invalid(format!(
                    "-u {u} and --gid {flag} name different groups: give one"
                )));
            }
            let gid = group.or(req.gid);
            return match who.parse::<u32>() {
                Ok(uid) => Ok((ExecUser::Ids { uid, gid }, None)),
                Err(_) if gid.is_some() => Err(ApiError::invalid(format!(
                    "a group needs a numeric user: -u UID:GID instead of -u {u}"
                ))),
                Err(_) => Ok((ExecUser::Name(who.to_string()), None)),
            };
        }
        if let Some(uid) = req.uid {
            return Ok((ExecUser::Ids { uid, gid: req.gid }, None));
        }
        Ok((
            ExecUser::Ids {
                uid: user.uid,
                gid: Some(req.gid.unwrap_or(user.gid)),
            },
            None,
        ))
    }
}

/// The guest path at which the machine sees host path `cwd`, if it does: inside the shared
/// home (same path) or inside another mount (mapped to its guest path).
fn visible_path(record: &MachineRecord, cwd: &str) -> Option<String> {
    let cwd = Path::new(cwd);
    if record.home_mount != HomeMount::None && cwd.starts_with(&record.user.home) {
        return Some(cwd.display().to_string());
    }
    record.mounts.iter().find_map(|m| {
        cwd.strip_prefix(&m.host_path).ok().map(|rest| {
            if rest.as_os_str().is_empty() {
                m.guest_path.clone()
            } else {
                format!("{}/{}", m.guest_path, rest.display())
            }
        })
    })
}

impl Core {
    /// Boots the machine if needed and runs the process, relaying frames to `client`.
    pub(in crate::core) async fn machine_exec(
        &self,
        caller: &Caller,
        name: &str,
        req: RunRequest,
        client: Box<dyn ClientStream>,
    ) -> Result<(), ApiError> {
        let mut client = client;
        let prepared = async {
            let (_guard, record) = self.lock_visible(caller, name).await?;
            let mut spec = Self::exec_spec(&record, &req)?;
            spec.ssh_agent = Self::ssh_agent_forward(caller, &record, &req)?;
            self.boot(&record).await?;
            Ok::<_, ApiError>(spec)
        }
        .await;
        match prepared {
            Ok(spec) => self.state.vms.exec(name, spec, client).await,
            Err(e) => {
                // The connection is already upgraded: the error travels as a frame.
                let _ = container_api::session::Frame::Error(e.clone())
                    .write(&mut client)
                    .await;
                Err(e)
            }
        }
    }

    /// A connection to TCP `port` on the loopback of a running (or booted on demand)
    /// machine: the owner reaches what a process of theirs inside could.
    pub(in crate::core) async fn machine_connect(
        &self,
        caller: &Caller,
        name: &str,
        port: u16,
    ) -> Result<Box<dyn ClientStream>, ApiError> {
        if port == 0 {
            return Err(ApiError::invalid("port 0 is not a port to connect to"));
        }
        {
            let (_guard, record) = self.lock_visible(caller, name).await?;
            self.boot(&record).await?;
        }
        self.state.vms.connect(name, port).await
    }

    /// Copies a tar stream into a running (or booted on demand) machine.
    pub(in crate::core) async fn machine_copy_in(
        &self,
        caller: &Caller,
        name: &str,
        path: &str,
        tar: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    ) -> Result<(), ApiError> {
        let path = copy_path(path)?;
        {
            let (_guard, record) = self.lock_visible(caller, name).await?;
            self.boot(&record).await?;
        }
        self.state.vms.copy_in(name, &path, tar).await
    }

    /// A tar stream of a path in the machine.
    pub(in crate::core) async fn machine_copy_out(
        &self,
        caller: &Caller,
        name: &str,
        path: &str,
    ) -> Result<Box<dyn tokio::io::AsyncRead + Send + Unpin>, ApiError> {
        let path = copy_path(path)?;
        {
            let (_guard, record) = self.lock_visible(caller, name).await?;
            self.boot(&record).await?;
        }
        self.state.vms.copy_out(name, &path).await
    }
}

/// A guest path of `cp`: normalised as [`guest_path`], keeping what `cp` reads from its end
/// (a trailing `/` asks for a directory, `/.` for a directory's contents).
fn copy_path(path: &str) -> Result<String, ApiError> {
    if path == "/" || path == "/." {
        return Ok(path.into());
    }
    let base = guest_path(path)?;
    Ok(if path.ends_with("/.") {
        format!("{base}/.")
    } else if path.ends_with('/') {
        format!("{base}/")
    } else {
        base
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::machines::mac_for;
    use container_api::machine::{MachineUser, MountSpec};

    fn record(home_mount: HomeMount) -> MachineRecord {
        MachineRecord {
            name: "dev".into(),
            owner_uid: 1000,
            user: MachineUser {
                name: "alice".into(),
                uid: 1000,
                gid: 1000,
                home: "/home/alice".into(),
                shell: "/bin/bash".into(),
            },
            image: "i".into(),
            image_digest: "sha256:0".into(),
            stop_signal: None,
            created: chrono::Utc::now(),
            cpus: 1,
            memory: 1 << 30,
            disk_size: 1 << 30,
            home_mount,
            mounts: vec![MountSpec {
                host_path: "/srv/data".into(),
                guest_path: "/data".into(),
                read_only: true,
            }],
            network: "default".into(),
            kernel: None,
            ip_address: None,
            mac: mac_for("dev"),
            pending_restart: false,
            instance: None,
            autostart: false,
            forward_ports: true,
            publish: vec![],
        }
    }

    fn run(cmd: &[&str], cwd: &str) -> RunRequest {
        RunRequest {
            command: cmd.iter().map(|s| s.to_string()).collect(),
            caller_cwd: Some(cwd.into()),
            ..Default::default()
        }
    }

    #[test]
    fn run_lands_in_the_callers_directory_when_visible() {
        let r = record(HomeMount::Rw);
        assert_eq!(
            Core::exec_spec(&r, &run(&["pwd"], "/home/alice/src/x"))
                .unwrap()
                .cwd,
            "/home/alice/src/x"
        );
        assert_eq!(
            Core::exec_spec(&r, &run(&["pwd"], "/srv/data/a"))
                .unwrap()
                .cwd,
            "/data/a"
        );
        assert_eq!(
            Core::exec_spec(&r, &run(&["pwd"], "/srv/data"))
                .unwrap()
                .cwd,
            "/data"
        );
        assert_eq!(
            Core::exec_spec(&r, &run(&["pwd"], "/opt")).unwrap().cwd,
            "/home/alice"
        );
        // With no home share, the host home is not visible: start in the guest home.
        let none = record(HomeMount::None);
        assert_eq!(
            Core::exec_spec(&none, &run(&["pwd"], "/home/alice/src"))
                .unwrap()
                .cwd,
            "/home/alice"
        );
        let mut w = run(&["pwd"], "/home/alice");
        w.workdir = Some("/tmp".into());
        assert_eq!(Core::exec_spec(&r, &w).unwrap().cwd, "/tmp");
        w.workdir = Some("relative".into());
        assert!(Core::exec_spec(&r, &w).is_err());
    }

    #[test]
    fn commands_go_through_the_shell_unless_asked_not_to() {
        let r = record(HomeMount::Rw);
        let mut req = run(&["[ -d /tmp ]", "&&", "echo", "$HOME"], "/");
        let spec = Core::exec_spec(&r, &req).unwrap();
        assert_eq!(spec.argv, ["/bin/sh", "-c", "[ -d /tmp ] && echo $HOME"]);
        assert_eq!(spec.arg0, None);
        req.no_shell = true;
        let spec = Core::exec_spec(&r, &req).unwrap();
        assert_eq!(spec.argv, ["[ -d /tmp ]", "&&", "echo", "$HOME"]);
        // `-e` values are the process's environment either way: the shell expands them.
        req.env = vec!["MY_VAR=x".into()];
        req.no_shell = false;
        assert!(
            Core::exec_spec(&r, &req)
                .unwrap()
                .env
                .contains(&"MY_VAR=x".to_string())
        );
    }

    #[test]
    fn only_the_owners_own_agent_is_forwarded_and_only_when_asked() {
        let r = record(HomeMount::Rw);
        let caller = |uid| Caller {
            uid,
            gid: uid,
            pid: None,
        };
        let mut req = run(&["ssh-add", "-l"], "/");
        assert_eq!(
            Core::ssh_agent_forward(&caller(1000), &r, &req).unwrap(),
            None
        );
        req.ssh_auth_sock = Some("/tmp/ssh-x/agent.1".into());
        assert_eq!(
            Core::ssh_agent_forward(&caller(1000), &r, &req).unwrap(),
            Some(SshAgentForward {
                path: "/tmp/ssh-x/agent.1".into(),
                uid: 1000,
                gid: 1000
            })
        );
        // Root in a user's machine: its agent would be the user's to use.
        assert_eq!(Core::ssh_agent_forward(&caller(0), &r, &req).unwrap(), None);
        for bad in ["agent.sock", "/tmp/a\0b", &format!("/{}", "x".repeat(200))] {
            req.ssh_auth_sock = Some(bad.to_string());
            let e = Core::ssh_agent_forward(&caller(1000), &r, &req).unwrap_err();
            assert_eq!(e.kind, container_api::ErrorKind::InvalidArgument, "{bad}");
            assert!(e.message.contains("SSH_AUTH_SOCK"), "{e:?}");
        }
    }

    #[test]
    fn no_command_means_a_login_shell_as_the_user() {
        let spec = Core::exec_spec(&record(HomeMount::Rw), &run(&[], "/")).unwrap();
        assert_eq!(spec.argv, ["/bin/bash"]);
        assert_eq!(spec.arg0.as_deref(), Some("-bash"));
        assert_eq!(
            spec.user,
            ExecUser::Ids {
                uid: 1000,
                gid: Some(1000)
            }
        );
        assert!(spec.env.contains(&"USER=alice".to_string()));
        assert!(spec.env.contains(&"HOME=/home/alice".to_string()));
    }

    /// (uid, gid, supplementary groups) `run` asks for, or the refusal.
    fn who(
        root: bool,
        user: Option<&str>,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> Result<(ExecUser, Option<Vec<u32>>), ApiError> {
        let req = RunRequest {
            command: vec!["id".into()],
            root,
            user: user.map(str::to_string),
            uid,
            gid,
            ..Default::default()
        };
        Core::exec_spec(&record(HomeMount::Rw), &req).map(|s| (s.user, s.groups))
    }

    fn ids(uid: u32, gid: Option<u32>) -> ExecUser {
        ExecUser::Ids { uid, gid }
    }

    #[test]
    fn every_user_flag_combination_means_one_thing() {
        // Nobody named: the machine's user; --gid replaces its primary group.
        assert_eq!(
            who(false, None, None, None).unwrap(),
            (ids(1000, Some(1000)), None)
        );
        assert_eq!(
            who(false, None, None, Some(5)).unwrap(),
            (ids(1000, Some(5)), None)
        );
        // --root: 0/0; --gid adds a supplementary group (Apple: `id -G` prints `0 1000`).
        assert_eq!(
            who(true, None, None, None).unwrap(),
            (ids(0, Some(0)), None)
        );
        assert_eq!(
            who(true, None, None, Some(1000)).unwrap(),
            (ids(0, Some(0)), Some(vec![1000]))
        );
        assert_eq!(
            who(true, None, None, Some(0)).unwrap(),
            (ids(0, Some(0)), None)
        );
        // --uid (Apple: `--uid 1000 id -u` prints 1000), with or without --gid.
        assert_eq!(
            who(false, None, Some(1000), None).unwrap(),
            (ids(1000, None), None)
        );
        assert_eq!(
            who(false, None, Some(33), Some(44)).unwrap(),
            (ids(33, Some(44)), None)
        );
        // -u UID[:GID] (Apple: `--user 1000:1000` gives `1000:1000`); --gid fills a missing group.
        assert_eq!(
            who(false, Some("1000:1000"), None, None).unwrap(),
            (ids(1000, Some(1000)), None)
        );
        assert_eq!(
            who(false, Some("33"), None, None).unwrap(),
            (ids(33, None), None)
        );
        assert_eq!(
            who(false, Some("33"), None, Some(44)).unwrap(),
            (ids(33, Some(44)), None)
        );
        assert_eq!(
            who(false, Some("33:44"), None, Some(44)).unwrap(),
            (ids(33, Some(44)), None)
        );
        assert_eq!(
            who(false, Some("postgres"), None, None).unwrap(),
            (ExecUser::Name("postgres".into()), None)
        );
        // Contradictions are refused, not resolved by one flag silently winning.
        for (root, user, uid, gid) in [
            (true, Some("33"), None, None),
            (true, None, Some(33), None),
            (false, Some("33"), Some(33), None),
            (false, Some("33:44"), None, Some(45)),
            (false, Some("postgres:44"), None, None),
            (false, Some("postgres"), None, Some(44)),
            (false, Some("33:x"), None, None),
        ] {
            let e = who(root, user, uid, gid).unwrap_err();
            assert_eq!(
                e.kind,
                container_api::ErrorKind::InvalidArgument,
                "{root} {user:?} {uid:?} {gid:?}: {e:?}"
            );
        }
    }

    #[test]
    fn users_and_env_follow_the_flags() {
        let r = record(HomeMount::Rw);
        let mut req = run(&["id"], "/");
        req.root = true;
        let spec = Core::exec_spec(&r, &req).unwrap();
        assert_eq!(
            spec.user,
            ExecUser::Ids {
                uid: 0,
                gid: Some(0)
            }
        );
        assert!(spec.env.contains(&"HOME=/root".to_string()));
        req.root = false;
        req.user = Some("postgres".into());
        assert_eq!(
            Core::exec_spec(&r, &req).unwrap().user,
            ExecUser::Name("postgres".into())
        );
        req.user = Some("33:44".into());
        assert_eq!(
            Core::exec_spec(&r, &req).unwrap().user,
            ExecUser::Ids {
                uid: 33,
                gid: Some(44)
            }
        );
        req.user = Some("33:x".into());
        assert!(Core::exec_spec(&r, &req).is_err());
        req.user = None;
        req.env = vec!["HOME=/elsewhere".into(), "A=1".into()];
        let env = Core::exec_spec(&r, &req).unwrap().env;
        assert!(env.contains(&"HOME=/elsewhere".to_string()));
        assert!(!env.contains(&"HOME=/home/alice".to_string()));
        assert!(env.contains(&"A=1".to_string()));
    }
}
