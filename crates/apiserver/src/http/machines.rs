//! `/v1/machines/*` routes.

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, Request as HttpRequest, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use container_api::ApiError;
use container_api::machine::{
    CloneRequest, CommitRequest, ConnectRequest, CreateRequest, RenameRequest, RunRequest,
    SetRequest, SnapshotCreateRequest, SnapshotRestoreRequest, StopRequest,
};
use futures::TryStreamExt;
use serde::Deserialize;

use super::{ApiResponseError, JsonBody, answer};
use crate::core::{Caller, Core, Reply, Request};

pub fn routes() -> Router<Core> {
    Router::new()
        .route("/machines", get(list).post(create))
        .route("/machines/{name}", get(inspect).delete(delete))
        .route("/machines/{name}/start", post(start))
        .route("/machines/{name}/stop", post(stop))
        .route("/machines/{name}/set", post(set))
        .route("/machines/{name}/default", post(set_default))
        .route("/machines/{name}/logs", get(logs))
        .route("/machines/{name}/exec", post(exec))
        .route("/machines/{name}/connect", post(connect))
        .route("/machines/{name}/copy-in", post(copy_in))
        .route("/machines/{name}/copy-out", get(copy_out))
        .route("/machines/{name}/clone", post(clone))
        .route("/machines/{name}/commit", post(commit))
        .route("/machines/{name}/rename", post(rename))
        .route("/machines/{name}/ports", get(ports))
        .route(
            "/machines/{name}/snapshots",
            get(snapshot_list).post(snapshot_create),
        )
        .route(
            "/machines/{name}/snapshots/{snapshot}",
            axum::routing::delete(snapshot_delete),
        )
        .route(
            "/machines/{name}/snapshots/{snapshot}/restore",
            post(snapshot_restore),
        )
        .route("/stats", get(stats))
}

async fn clone(
    State(core): State<Core>,
    caller: Caller,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<CloneRequest>,
) -> Response {
    let request = Request::MachineClone {
        name,
        new: body.name,
    };
    answer(&core, &caller, request).await
}

async fn commit(
    State(core): State<Core>,
    caller: Caller,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<CommitRequest>,
) -> Response {
    let request = Request::MachineCommit {
        name,
        image: body.image,
    };
    answer(&core, &caller, request).await
}

async fn rename(
    State(core): State<Core>,
    caller: Caller,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<RenameRequest>,
) -> Response {
    let request = Request::MachineRename {
        name,
        new: body.name,
    };
    answer(&core, &caller, request).await
}

async fn ports(State(core): State<Core>, caller: Caller, Path(name): Path<String>) -> Response {
    answer(&core, &caller, Request::MachinePorts(name)).await
}

async fn snapshot_list(
    State(core): State<Core>,
    caller: Caller,
    Path(name): Path<String>,
) -> Response {
    answer(&core, &caller, Request::SnapshotList(name)).await
}

async fn snapshot_create(
    State(core): State<Core>,
    caller: Caller,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<SnapshotCreateRequest>,
) -> Response {
    let request = Request::SnapshotCreate {
        name,
        snapshot: body.name,
    };
    answer(&core, &caller, request).await
}

async fn snapshot_restore(
    State(core): State<Core>,
    caller: Caller,
    Path((name, snapshot)): Path<(String, String)>,
    JsonBody(body): JsonBody<SnapshotRestoreRequest>,
) -> Response {
    let request = Request::SnapshotRestore {
        name,
        snapshot,
        force: body.force,
    };
    answer(&core, &caller, request).await
}

async fn snapshot_delete(
    State(core): State<Core>,
    caller: Caller,
    Path((name, snapshot)): Path<(String, String)>,
) -> Response {
    answer(&core, &caller, Request::SnapshotDelete { name, snapshot }).await
}

async fn stats(
    State(core): State<Core>,
    caller: Caller,
    Query(q): Query<container_api::stats::StatsQuery>,
) -> Response {
    let names = q
        .names
        .split(',')
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .collect();
    answer(&core, &caller, Request::MachineStats { names, all: q.all }).await
}

async fn list(State(core): State<Core>, caller: Caller) -> Response {
    answer(&core, &caller, Request::MachineList).await
}

async fn create(
    State(core): State<Core>,
    caller: Caller,
    JsonBody(body): JsonBody<CreateRequest>,
) -> Response {
    answer(&core, &caller, Request::MachineCreate(body)).await
}

async fn inspect(State(core): State<Core>, caller: Caller, Path(name): Path<String>) -> Response {
    answer(&core, &caller, Request::MachineInspect(name)).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteQuery {
    #[serde(default)]
    force: bool,
}

async fn delete(
    State(core): State<Core>,
    caller: Caller,
    Path(name): Path<String>,
    Query(q): Query<DeleteQuery>,
) -> Response {
    answer(
        &core,
        &caller,
        Request::MachineDelete {
            name,
            force: q.force,
        },
    )
    .await
}

async fn start(State(core): State<Core>, caller: Caller, Path(name): Path<String>) -> Response {
    answer(&core, &caller, Request::MachineStart(name)).await
}

async fn stop(
    State(core): State<Core>,
    caller: Caller,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<StopRequest>,
) -> Response {
    answer(&core, &caller, Request::MachineStop(name, body)).await
}

async fn set(
    State(core): State<Core>,
    caller: Caller,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<SetRequest>,
) -> Response {
    answer(
        &core,
        &caller,
        Request::MachineSet {
            name,
            settings: body,
        },
    )
    .await
}

async fn set_default(
    State(core): State<Core>,
    caller: Caller,
    Path(name): Path<String>,
) -> Response {
    answer(&core, &caller, Request::MachineSetDefault(name)).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogsQuery {
    #[serde(default)]
    boot: bool,
    #[serde(default)]
    follow: bool,
    lines: Option<usize>,
}

async fn logs(
    State(core): State<Core>,
    caller: Caller,
    Path(name): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Response {
    let path = match core
        .handle(&caller, Request::MachineLogs { name, boot: q.boot })
        .await
    {
        Ok(Reply::File(p)) => p,
        Ok(_) => return ApiResponseError(ApiError::internal("unexpected reply")).into_response(),
        Err(e) => return ApiResponseError(e).into_response(),
    };
    let stream = crate::logs::stream(path, q.lines, q.follow);
    Response::builder()
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn exec(
    State(core): State<Core>,
    caller: Caller,
    Path(name): Path<String>,
    request: HttpRequest,
) -> Response {
    let (mut parts, body) = request.into_parts();
    let Some(on_upgrade) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
        return ApiResponseError(ApiError::invalid(
            "exec needs an HTTP upgrade (Connection: upgrade, Upgrade: container-exec)",
        ))
        .into_response();
    };
    let bytes = match axum::body::to_bytes(body, 1 << 20).await {
        Ok(b) => b,
        Err(e) => {
            return ApiResponseError(ApiError::invalid(format!("reading the body: {e}")))
                .into_response();
        }
    };
    let run: RunRequest = match serde_json::from_slice(&bytes) {
        Ok(r) => r,
        Err(e) => {
            return ApiResponseError(ApiError::invalid(format!("invalid request body: {e}")))
                .into_response();
        }
    };
    // Answer "not found" as a plain HTTP error before switching protocols.
    if let Err(e) = core
        .handle(&caller, Request::MachineInspect(name.clone()))
        .await
    {
        return ApiResponseError(e).into_response();
    }
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let client = Box::new(hyper_util::rt::TokioIo::new(upgraded));
                let request = Request::MachineExec {
                    name,
                    request: run,
                    client,
                };
                if let Err(e) = core.handle(&caller, request).await {
                    tracing::debug!(error = %e, "exec session ended with an error");
                }
            }
            Err(e) => tracing::warn!(error = %e, "exec upgrade failed"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "container-exec")
        .body(Body::empty())
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Connects to a guest port first, so a failure is a plain HTTP error; then switches
/// protocols and splices the two connections until both directions are closed.
async fn connect(
    State(core): State<Core>,
    caller: Caller,
    Path(name): Path<String>,
    request: HttpRequest,
) -> Response {
    let (mut parts, body) = request.into_parts();
    let Some(on_upgrade) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
        return ApiResponseError(ApiError::invalid(
            "connect needs an HTTP upgrade (Connection: upgrade, Upgrade: container-connect)",
        ))
        .into_response();
    };
    let bytes = match axum::body::to_bytes(body, 1 << 16).await {
        Ok(b) => b,
        Err(e) => {
            return ApiResponseError(ApiError::invalid(format!("reading the body: {e}")))
                .into_response();
        }
    };
    let connect: ConnectRequest = match serde_json::from_slice(&bytes) {
        Ok(r) => r,
        Err(e) => {
            return ApiResponseError(ApiError::invalid(format!("invalid request body: {e}")))
                .into_response();
        }
    };
    let request = Request::MachineConnect {
        name,
        port: connect.port,
    };
    let mut guest = match core.handle(&caller, request).await {
        Ok(Reply::Tunnel(t)) => t.0,
        Ok(_) => {
            return ApiResponseError(ApiError::internal("connect: unexpected reply"))
                .into_response();
        }
        Err(e) => return ApiResponseError(e).into_response(),
    };
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let mut client = hyper_util::rt::TokioIo::new(upgraded);
                if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut guest).await {
                    tracing::debug!(error = %e, "connection into a machine ended");
                }
            }
            Err(e) => tracing::warn!(error = %e, "connect upgrade failed"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "container-connect")
        .body(Body::empty())
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PathQuery {
    path: String,
}

async fn copy_in(
    State(core): State<Core>,
    caller: Caller,
    Path(name): Path<String>,
    Query(q): Query<PathQuery>,
    body: Body,
) -> Response {
    let stream = body.into_data_stream().map_err(std::io::Error::other);
    let tar = Box::new(tokio_util::io::StreamReader::new(stream));
    match core
        .handle(
            &caller,
            Request::MachineCopyIn {
                name,
                path: q.path,
                tar,
            },
        )
        .await
    {
        Ok(_) => axum::Json(serde_json::json!({})).into_response(),
        Err(e) => ApiResponseError(e).into_response(),
    }
}

async fn copy_out(
    State(core): State<Core>,
    caller: Caller,
    Path(name): Path<String>,
    Query(q): Query<PathQuery>,
) -> Response {
    match core
        .handle(&caller, Request::MachineCopyOut { name, path: q.path })
        .await
    {
        Ok(Reply::Stream(s)) => Response::builder()
            .header(header::CONTENT_TYPE, "application/x-tar")
            .body(Body::from_stream(tokio_util::io::ReaderStream::new(s.0)))
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()),
        Ok(_) => ApiResponseError(ApiError::internal("unexpected reply")).into_response(),
        Err(e) => ApiResponseError(e).into_response(),
    }
}
