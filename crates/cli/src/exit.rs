//! What the CLI exits with. The codes and what maps to them live in one table, the API's
//! [`ExitCode`]; this module only finds, in an error chain, the first error that table knows:
//! a call to the service that failed, an error the service sent (for `run`, in the session),
//! or a [`Failed`] the CLI raised itself. Anything else is a generic failure.

use container_api::client::ClientError;
use container_api::{ApiError, ExitCode};

/// A failure the CLI finds without asking the service, tagged with the code it stands for.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Failed {
    pub exit: ExitCode,
    pub message: String,
}

/// A [`Failed`] as an `anyhow` error, for `?` and `return Err(…)`.
pub fn failed(exit: ExitCode, message: impl Into<String>) -> anyhow::Error {
    Failed {
        exit,
        message: message.into(),
    }
    .into()
}

/// The exit code of a command that failed with `error`.
pub fn code_of(error: &anyhow::Error) -> ExitCode {
    error
        .chain()
        .find_map(|cause| {
            if let Some(e) = cause.downcast_ref::<ClientError>() {
                Some(e.exit_code())
            } else if let Some(e) = cause.downcast_ref::<ApiError>() {
                Some(e.kind.exit_code())
            } else {
                cause.downcast_ref::<Failed>().map(|f| f.exit)
            }
        })
        .unwrap_or(ExitCode::Failure)
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;
    use container_api::ErrorKind;

    #[test]
    fn the_first_known_error_in_the_chain_decides() {
        let not_found: anyhow::Error = ClientError::Api(ApiError::not_found("no machine x")).into();
        assert_eq!(code_of(&not_found), ExitCode::NotFound);
        // Context added on the way up does not hide it.
        let wrapped = Err::<(), _>(not_found).context("inspecting x").unwrap_err();
        assert_eq!(code_of(&wrapped), ExitCode::NotFound);

        let session: anyhow::Error = ApiError::new(ErrorKind::PermissionDenied, "not yours").into();
        assert_eq!(code_of(&session), ExitCode::PermissionDenied);

        let absent: anyhow::Error = ClientError::NotRunning {
            socket: "/nowhere.sock".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        }
        .into();
        assert_eq!(code_of(&absent), ExitCode::ServiceUnavailable);

        let local = failed(ExitCode::Usage, "expected KEY=VALUE");
        assert_eq!(code_of(&local), ExitCode::Usage);
        assert_eq!(local.to_string(), "expected KEY=VALUE");

        assert_eq!(code_of(&anyhow::anyhow!("disk full")), ExitCode::Failure);
    }
}
