//! `/v1/system/*` routes.

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use container_api::ApiError;
use serde::Deserialize;

use super::{ApiResponseError, answer};
use crate::core::{Caller, Core, Reply, Request};

pub fn routes() -> Router<Core> {
    Router::new()
        .route("/system/status", get(status))
        .route("/system/df", get(disk_usage))
        .route("/system/properties", get(properties))
        .route("/system/shutdown", post(shutdown))
        .route("/system/kernel", post(kernel))
        .route("/system/events", get(events))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    machine: Option<String>,
}

/// Newline-delimited JSON, one event a line, for as long as the client reads (a chunked
/// response: it has no end of its own).
async fn events(
    State(core): State<Core>,
    caller: Caller,
    Query(q): Query<EventsQuery>,
) -> Response {
    let stream = match core
        .handle(&caller, Request::Events { machine: q.machine })
        .await
    {
        Ok(Reply::Events(s)) => s,
        Ok(_) => return ApiResponseError(ApiError::internal("unexpected reply")).into_response(),
        Err(e) => return ApiResponseError(e).into_response(),
    };
    let lines = futures::stream::unfold(stream, |mut stream| async move {
        let event = stream.next().await?;
        let mut line = serde_json::to_vec(&event).unwrap_or_default();
        line.push(b'\n');
        Some((Ok::<_, std::convert::Infallible>(line), stream))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(lines))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn status(State(core): State<Core>, caller: Caller) -> Response {
    answer(&core, &caller, Request::SystemStatus).await
}

async fn disk_usage(State(core): State<Core>, caller: Caller) -> Response {
    answer(&core, &caller, Request::DiskUsage).await
}

async fn properties(State(core): State<Core>, caller: Caller) -> Response {
    answer(&core, &caller, Request::SystemProperties).await
}

async fn shutdown(State(core): State<Core>, caller: Caller) -> Response {
    answer(&core, &caller, Request::SystemShutdown).await
}

async fn kernel(
    State(core): State<Core>,
    caller: Caller,
    super::JsonBody(body): super::JsonBody<container_api::system::KernelSetRequest>,
) -> Response {
    answer(&core, &caller, Request::KernelSet(body)).await
}
