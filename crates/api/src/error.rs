//! The one error shape the API returns: a machine-readable kind and a human sentence. Each kind
//! maps to one HTTP status and one CLI exit code, so scripts can rely on both. [`ExitCode`] is
//! the one table of the CLI's exit codes: the kinds the service answers with and the failures
//! the CLI meets on its own (no service to talk to) both map into it here.

use serde::{Deserialize, Serialize};

/// What kind of failure an API call met.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request was malformed or a value was out of range.
    InvalidArgument,
    /// The named object does not exist (or belongs to someone else).
    NotFound,
    /// An object with that name already exists.
    AlreadyExists,
    /// The object is in a state that forbids the operation (running, in use).
    Conflict,
    /// The caller may not do this.
    PermissionDenied,
    /// A remote party (registry, guest) failed or could not be reached.
    Unavailable,
    /// A bug or an unexpected host failure.
    Internal,
}

impl ErrorKind {
    /// The HTTP status the service answers with.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorKind::InvalidArgument => 400,
            ErrorKind::PermissionDenied => 403,
            ErrorKind::NotFound => 404,
            ErrorKind::AlreadyExists | ErrorKind::Conflict => 409,
            ErrorKind::Unavailable => 502,
            ErrorKind::Internal => 500,
        }
    }

    /// What the CLI exits with when the service answers with this kind. A value the service
    /// finds invalid is a usage error, as one clap rejects is: the command line must change.
    /// A registry or guest that fails is a generic failure, not "service unavailable": the
    /// service answered, and starting it would not help.
    pub fn exit_code(self) -> ExitCode {
        match self {
            ErrorKind::InvalidArgument => ExitCode::Usage,
            ErrorKind::NotFound => ExitCode::NotFound,
            ErrorKind::PermissionDenied => ExitCode::PermissionDenied,
            ErrorKind::AlreadyExists | ErrorKind::Conflict => ExitCode::Conflict,
            ErrorKind::Unavailable | ErrorKind::Internal => ExitCode::Failure,
        }
    }

    /// The kind a status maps back to, for bodies that are not ours (a proxy, a crash).
    pub fn from_http_status(status: u16) -> Self {
        match status {
            400 | 422 => ErrorKind::InvalidArgument,
            403 => ErrorKind::PermissionDenied,
            404 => ErrorKind::NotFound,
            409 => ErrorKind::Conflict,
            502 | 503 => ErrorKind::Unavailable,
            _ => ErrorKind::Internal,
        }
    }
}

/// What the `container` CLI exits with: the one table of its exit codes, which README.md,
/// docs/ARCHITECTURE.md ("Exit codes") and `container --help` repeat. The numbers are stable;
/// scripts test them. They stay below 64 so that none is read as a shell's "not found" (127)
/// or "killed by a signal" (128+N). `machine run` exits with its process's status once the
/// process has started; its failures before that use this table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCode {
    /// The command did what it was asked.
    Success,
    /// Any failure without a code of its own; the message says which.
    Failure,
    /// The command line is wrong: clap rejected it, or the service found a value invalid.
    Usage,
    /// A machine or image named (or the default machine) does not exist, or is not yours.
    NotFound,
    /// The caller may not do this.
    PermissionDenied,
    /// The name is taken, or the object's state forbids it (running, in use).
    Conflict,
    /// The service is not running, or its socket does not answer.
    ServiceUnavailable,
}

impl ExitCode {
    /// Every code, in numeric order.
    pub const ALL: [ExitCode; 7] = [
        ExitCode::Success,
        ExitCode::Failure,
        ExitCode::Usage,
        ExitCode::NotFound,
        ExitCode::PermissionDenied,
        ExitCode::Conflict,
        ExitCode::ServiceUnavailable,
    ];

    /// The number the process exits with.
    pub fn code(self) -> u8 {
        match self {
            ExitCode::Success => 0,
            ExitCode::Failure => 1,
            ExitCode::Usage => 2,
            ExitCode::NotFound => 3,
            ExitCode::PermissionDenied => 4,
            ExitCode::Conflict => 5,
            ExitCode::ServiceUnavailable => 6,
        }
    }

    /// What the code means, in a few words for `--help`.
    pub fn meaning(self) -> &'static str {
        match self {
            ExitCode::Success => "success",
            ExitCode::Failure => "any other failure (the message says which)",
            ExitCode::Usage => "usage error: a bad flag, or a value the service refuses",
            ExitCode::NotFound => "no such machine or image",
            ExitCode::PermissionDenied => "permission denied",
            ExitCode::Conflict => "conflict: the name is taken, or the machine or image is in use",
            ExitCode::ServiceUnavailable => "the container service is not running or unreachable",
        }
    }

    /// The code when the CLI cannot connect to the service's socket: a socket this user may
    /// not open is a permission problem; anything else (no socket, nothing listening) means
    /// there is no service to talk to.
    pub fn for_unreachable_service(cause: &std::io::Error) -> Self {
        match cause.kind() {
            std::io::ErrorKind::PermissionDenied => ExitCode::PermissionDenied,
            _ => ExitCode::ServiceUnavailable,
        }
    }

    /// The table as `--help` shows it, one code a line.
    pub fn help_table() -> String {
        let mut text = String::from("Exit codes:\n");
        for exit in Self::ALL {
            text.push_str(&format!("  {}  {}\n", exit.code(), exit.meaning()));
        }
        text.push_str("  `machine run` exits with its command's status once the command started.");
        text
    }
}

/// An error as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(deny_unknown_fields)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ApiError {
    /// An error whose message is `error` and all its causes, joined by `: `: API errors
    /// travel as one sentence, so the chain is spelled out once, here.
    pub fn with_chain(kind: ErrorKind, error: &dyn std::error::Error) -> Self {
        let mut message = error.to_string();
        let mut source = error.source();
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        Self::new(kind, message)
    }

    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Conflict, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KINDS: [ErrorKind; 7] = [
        ErrorKind::InvalidArgument,
        ErrorKind::NotFound,
        ErrorKind::AlreadyExists,
        ErrorKind::Conflict,
        ErrorKind::PermissionDenied,
        ErrorKind::Unavailable,
        ErrorKind::Internal,
    ];

    #[test]
    fn each_kind_exits_with_its_documented_code() {
        let codes: Vec<(ErrorKind, u8)> =
            KINDS.iter().map(|k| (*k, k.exit_code().code())).collect();
        assert_eq!(
            codes,
            [
                (ErrorKind::InvalidArgument, 2),
                (ErrorKind::NotFound, 3),
                (ErrorKind::AlreadyExists, 5),
                (ErrorKind::Conflict, 5),
                (ErrorKind::PermissionDenied, 4),
                (ErrorKind::Unavailable, 1),
                (ErrorKind::Internal, 1),
            ]
        );
    }

    #[test]
    fn codes_are_distinct_small_and_in_order() {
        let codes: Vec<u8> = ExitCode::ALL.iter().map(|e| e.code()).collect();
        assert_eq!(codes, (0..ExitCode::ALL.len() as u8).collect::<Vec<_>>());
        // Clear of the shell's 126/127 and 128+N, which `machine run` passes through.
        assert!(codes.iter().all(|c| *c < 64));
    }

    #[test]
    fn a_socket_nobody_answers_is_an_absent_service_and_a_refused_one_a_permission_error() {
        use std::io::{Error, ErrorKind as Io};
        for kind in [Io::NotFound, Io::ConnectionRefused, Io::TimedOut] {
            assert_eq!(
                ExitCode::for_unreachable_service(&Error::from(kind)),
                ExitCode::ServiceUnavailable,
                "{kind:?}"
            );
        }
        assert_eq!(
            ExitCode::for_unreachable_service(&Error::from(Io::PermissionDenied)),
            ExitCode::PermissionDenied
        );
    }

    #[test]
    fn the_help_table_lists_every_code_once() {
        let table = ExitCode::help_table();
        for exit in ExitCode::ALL {
            let line = format!("  {}  {}", exit.code(), exit.meaning());
            assert_eq!(table.matches(&line).count(), 1, "{table}");
        }
    }

    #[test]
    fn http_statuses_round_trip_to_the_same_exit_code() {
        // A body that is not ours still exits as its status says.
        for kind in KINDS {
            assert_eq!(
                ErrorKind::from_http_status(kind.http_status()).exit_code(),
                kind.exit_code(),
                "{kind:?}"
            );
        }
    }
}
