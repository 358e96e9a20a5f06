//! The HTTP/1.1 + JSON face of the core, on a Unix socket. Handlers only translate: they parse
//! the path and body into a [`Request`], call [`Core::handle`] and write the [`Reply`] or the
//! [`ApiError`] back. The caller's identity comes from SO_PEERCRED, never from the request.

mod images;
mod machines;
mod system;

use std::path::Path;

use axum::extract::connect_info::{self, ConnectInfo};
use axum::extract::{FromRequest, FromRequestParts, Request as HttpRequest};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::serve::IncomingStream;
use axum::{Json, Router};
use container_api::{API_PREFIX, ApiError};
use serde::de::DeserializeOwned;
use tokio::net::UnixListener;

use crate::core::{Caller, Core, Reply, Request};

/// Peer credentials of one connection.
#[derive(Debug, Clone, Copy)]
pub struct PeerCred(pub Option<Caller>);

impl connect_info::Connected<IncomingStream<'_, UnixListener>> for PeerCred {
    fn connect_info(stream: IncomingStream<'_, UnixListener>) -> Self {
        PeerCred(stream.io().peer_cred().ok().map(|c| Caller {
            uid: c.uid(),
            gid: c.gid(),
            pid: c.pid(),
        }))
    }
}

impl FromRequestParts<Core> for Caller {
    type Rejection = ApiResponseError;

    async fn from_request_parts(parts: &mut Parts, state: &Core) -> Result<Self, Self::Rejection> {
        let ConnectInfo(PeerCred(cred)) = ConnectInfo::<PeerCred>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::internal("connection without peer credentials"))?;
        cred.ok_or_else(|| {
            ApiError::new(
                container_api::ErrorKind::PermissionDenied,
                "cannot identify the caller of this connection",
            )
            .into()
        })
    }
}

/// An `ApiError` as an HTTP response.
#[derive(Debug)]
pub struct ApiResponseError(pub ApiError);

impl From<ApiError> for ApiResponseError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl IntoResponse for ApiResponseError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.kind.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.0)).into_response()
    }
}

/// A JSON body whose parse errors become `invalid_argument` API errors naming the problem.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiResponseError;

    async fn from_request(req: HttpRequest, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::invalid(format!("reading the request body: {e}")))?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::invalid(format!("invalid request body: {e}")).into())
    }
}

/// Runs one request through the core and renders the reply as JSON.
pub async fn answer(core: &Core, caller: &Caller, request: Request) -> Response {
    match core.handle(caller, request).await {
        Ok(Reply::Empty {}) => StatusCode::NO_CONTENT.into_response(),
        Ok(reply) => Json(reply).into_response(),
        Err(e) => ApiResponseError(e).into_response(),
    }
}

/// The routes, all under `/v1`.
pub fn router(core: Core) -> Router {
    let v1 = Router::new()
        .merge(system::routes())
        .merge(images::routes())
        .merge(machines::routes());
    Router::new()
        .nest(API_PREFIX, v1)
        .fallback(|| async {
            ApiResponseError(ApiError::not_found(
                "no such API route (this service speaks /v1)",
            ))
        })
        .with_state(core)
}

/// Binds the service socket. A stale socket file (nobody answering) is replaced; a live one
/// means another service runs, which is refused.
pub async fn bind(socket: &Path) -> anyhow::Result<UnixListener> {
    use anyhow::Context;
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the socket directory {}", dir.display()))?;
    }
    if socket.exists() {
        if tokio::net::UnixStream::connect(socket).await.is_ok() {
            anyhow::bail!(
                "another container service is already listening on {}",
                socket.display()
            );
        }
        std::fs::remove_file(socket)
            .with_context(|| format!("removing the stale socket {}", socket.display()))?;
    }
    let listener =
        UnixListener::bind(socket).with_context(|| format!("listening on {}", socket.display()))?;
    // Anyone may connect: each request is authorised from the peer's uid.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o666))
        .with_context(|| format!("setting permissions of {}", socket.display()))?;
    Ok(listener)
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: UnixListener,
    core: Core,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(core).into_make_service_with_connect_info::<PeerCred>();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
