//! The one error shape the API returns: a machine-readable kind and a human sentence. Each kind
//! maps to one HTTP status and one CLI exit code, so scripts can rely on both.

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
