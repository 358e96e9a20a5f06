//! The runtime's errors: one variant per failure, the cause as `#[source]`. Each message a
//! user can meet names the thing (binary, kernel, machine, log) and says what to do. Nothing
//! in the runtime returns an API error: the mapping below is the one place a runtime error
//! becomes one (kind and whole chain), used at the service's edge.

use std::path::PathBuf;

use container_agent_proto::ProtoError;
use container_api::{ApiError, ErrorKind};

/// Why a runtime operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{name} not found: {hint}")]
    MissingBinary { name: String, hint: &'static str },
    #[error("no kernel is installed; run `container system kernel set --recommended` (as root)")]
    NoKernel,
    #[error("kernel {} is not a file", .0.display())]
    KernelNotAFile(PathBuf),
    #[error("module directory {} does not exist", .0.display())]
    ModulesNotADirectory(PathBuf),
    #[error(
        "apt-get is not available: `--recommended` needs a Debian or Ubuntu host; give a kernel with `container system kernel set --binary PATH --modules DIR`"
    )]
    NoApt,
    #[error(
        "no cloud kernel package is known to apt (tried {tried}); run `apt-get update`, or give a kernel with `container system kernel set --binary PATH --modules DIR`"
    )]
    NoKernelPackage { tried: String },
    #[error("{package} depends on no linux-image package")]
    NoVersionedKernel { package: String },
    #[error("the kernel package {package} has no {what}")]
    BadKernelPackage { package: String, what: String },
    #[error("{what} failed: {stderr}")]
    CommandFailed { what: String, stderr: String },
    #[error("cannot run {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the kernel has no module {name}, neither built in nor as a file under {}", modules.display())]
    MissingModule { name: String, modules: PathBuf },
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("socket path {} is longer than a Unix socket allows; use a shorter run directory", .0.display())]
    SocketPathTooLong(PathBuf),
    #[error("{helper} exited at start ({status}); its output is in {}", log.display())]
    HelperExited {
        helper: &'static str,
        status: String,
        log: PathBuf,
    },
    #[error("{helper} did not create {} within {secs} s; its output is in {}", socket.display(), log.display())]
    HelperTimeout {
        helper: &'static str,
        socket: PathBuf,
        secs: u64,
        log: PathBuf,
    },
    #[error("machine `{0}` is already running")]
    AlreadyRunning(String),
    #[error("machine `{0}` is not running")]
    NotRunning(String),
    #[error("machine `{0}` is starting or stopping; try again once it is running or stopped")]
    Changing(String),
    #[error(
        "the guest of machine `{machine}` could not freeze its filesystem for a consistent copy; stop the machine and try again"
    )]
    Freeze {
        machine: String,
        #[source]
        source: ProtoError,
    },
    #[error("the VMM of machine `{machine}` refused to switch to the new disk overlay")]
    SwitchDisk {
        machine: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "machine `{0}` is unresponsive: its guest agent does not answer; force it off with `container machine stop -f {0}` and start it again"
    )]
    Unresponsive(String),
    #[error("the VM exited during boot; last lines of {}:\n{tail}", log.display())]
    ExitedDuringBoot { log: PathBuf, tail: String },
    #[error("the guest agent did not answer within {secs} s; last lines of {}:\n{tail}", log.display())]
    AgentTimeout {
        secs: u64,
        log: PathBuf,
        tail: String,
        #[source]
        source: ProtoError,
    },
    #[error("the VM of machine `{0}` did not exit after being killed")]
    DidNotExit(String),
    #[error("talking to the guest agent")]
    Agent(#[source] ProtoError),
    /// The agent could not start a command for a reason other than its absence (126/127 are
    /// exit codes, not errors).
    #[error("{message}")]
    CommandRefused { message: String },
    /// The agent could not unpack an archive into the machine (its words name the path).
    #[error("{message}")]
    CopyInRefused { message: String },
    /// The agent could not archive a path of the machine (its words name the path).
    #[error("{message}")]
    CopyOutRefused { message: String },
    #[error("reading the archive")]
    ReadingArchive(#[source] std::io::Error),
    /// Nothing accepts connections on the guest port (the agent's words say which).
    #[error("{message}")]
    ConnectRefused { message: String },
    #[error("connecting machine `{machine}` to the machine network")]
    Tap {
        machine: String,
        #[source]
        source: super::vmm::TapError,
    },
    #[error(
        "disk {} is backed by {}, which is outside the image store; the disk was changed outside the service",
        disk.display(), backing.display()
    )]
    ForeignBacking { disk: PathBuf, backing: PathBuf },
    #[error("disk {} has a chain of more than {max} files", .disk.display())]
    DiskChainTooLong { disk: PathBuf, max: usize },
    #[error(
        "no free VM user: every uid of {first}-{last} runs a VM or belongs to an account; widen `vm-users` under [runtime] in config.toml"
    )]
    NoVmUser { first: u32, last: u32 },
    #[error("{} is not the socket vhost-device-vsock made for machine `{machine}`", path.display())]
    ForeignSocket { machine: String, path: PathBuf },
    #[error("machine `{0}` has a network device but this runtime has no machine network")]
    NoNetwork(String),
    #[error("connecting machine `{machine}` to the machine network")]
    Network {
        machine: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl RuntimeError {
    pub(crate) fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| RuntimeError::Io { what, path, source }
    }

    fn kind(&self) -> ErrorKind {
        use RuntimeError::*;
        match self {
            KernelNotAFile(_)
            | ModulesNotADirectory(_)
            | CommandRefused { .. }
            | CopyInRefused { .. }
            | ReadingArchive(_) => ErrorKind::InvalidArgument,
            CopyOutRefused { .. } => ErrorKind::NotFound,
            AlreadyRunning(_) | NotRunning(_) | Changing(_) | Unresponsive(_) => {
                ErrorKind::Conflict
            }
            MissingBinary { .. }
            | NoKernel
            | NoApt
            | NoKernelPackage { .. }
            | CommandFailed { .. }
            | HelperExited { .. }
            | HelperTimeout { .. }
            | ExitedDuringBoot { .. }
            | AgentTimeout { .. }
            | Agent(_)
            | Freeze { .. }
            | Tap { .. }
            | NoNetwork(_)
            | NoVmUser { .. }
            | ConnectRefused { .. }
            | Network { .. } => ErrorKind::Unavailable,
            _ => ErrorKind::Internal,
        }
    }
}

/// The message with its causes, printed once.
impl From<&RuntimeError> for ApiError {
    fn from(e: &RuntimeError) -> Self {
        ApiError::with_chain(e.kind(), e)
    }
}

impl From<RuntimeError> for ApiError {
    fn from(e: RuntimeError) -> Self {
        ApiError::from(&e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_errors_carry_the_cause_chain_and_kind() {
        let e =
            RuntimeError::io("reading", "/x")(std::io::Error::from(std::io::ErrorKind::NotFound));
        let api = ApiError::from(e);
        assert_eq!(api.kind, ErrorKind::Internal);
        assert!(api.message.starts_with("reading /x: "), "{}", api.message);
        let api = ApiError::from(RuntimeError::NotRunning("dev".into()));
        assert_eq!(api.kind, ErrorKind::Conflict);
        assert_eq!(api.message, "machine `dev` is not running");
        // The agent's words name the path; they reach the user as they are.
        let message = "/x in the machine: No such file or directory (os error 2)".to_string();
        let api = ApiError::from(RuntimeError::CopyOutRefused {
            message: message.clone(),
        });
        assert_eq!((api.kind, api.message), (ErrorKind::NotFound, message));
        // The network's error is told once, after the machine it concerns.
        let refused = std::io::Error::other("the bridge ct0 is not up");
        let api = ApiError::from(RuntimeError::Tap {
            machine: "dev".into(),
            source: super::super::vmm::TapError(Box::new(refused)),
        });
        assert_eq!(
            api.message,
            "connecting machine `dev` to the machine network: the bridge ct0 is not up"
        );
    }
}
