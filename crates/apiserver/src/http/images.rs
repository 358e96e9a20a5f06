//! `/v1/images/*` and `/v1/registry/*` routes.

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use container_api::image::{LoginRequest, PullRequest, PushRequest, TagRequest};
use futures::StreamExt;
use serde::Deserialize;

use super::{JsonBody, answer};
use crate::core::{Caller, Core, Request};

pub fn routes() -> Router<Core> {
    Router::new()
        .route("/images", get(list).delete(remove))
        .route("/images/inspect", get(inspect))
        .route("/images/pull", post(pull))
        .route("/images/push", post(push))
        .route("/images/tag", post(tag))
        .route("/images/load", post(load))
        .route("/images/save", get(save))
        .route("/images/prune", post(prune))
        .route("/registry/login", post(login))
        .route("/registry/logout", post(logout))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    #[serde(default)]
    all: bool,
}

async fn list(State(core): State<Core>, caller: Caller, Query(q): Query<ListQuery>) -> Response {
    answer(&core, &caller, Request::ImageList { all: q.all }).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RefQuery {
    reference: String,
    #[serde(default)]
    force: bool,
    #[serde(default)]
    system: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadQuery {
    #[serde(default)]
    system: bool,
}

async fn inspect(State(core): State<Core>, caller: Caller, Query(q): Query<RefQuery>) -> Response {
    answer(&core, &caller, Request::ImageInspect(q.reference)).await
}

async fn remove(State(core): State<Core>, caller: Caller, Query(q): Query<RefQuery>) -> Response {
    answer(
        &core,
        &caller,
        Request::ImageRemove {
            reference: q.reference,
            force: q.force,
            system: q.system,
        },
    )
    .await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PruneQuery {
    #[serde(default)]
    all: bool,
    #[serde(default)]
    system: bool,
}

async fn prune(State(core): State<Core>, caller: Caller, Query(q): Query<PruneQuery>) -> Response {
    answer(
        &core,
        &caller,
        Request::ImagePrune {
            all: q.all,
            system: q.system,
        },
    )
    .await
}

async fn tag(
    State(core): State<Core>,
    caller: Caller,
    JsonBody(body): JsonBody<TagRequest>,
) -> Response {
    answer(&core, &caller, Request::ImageTag(body)).await
}

/// Streams NDJSON progress; the pull goes on in its own task.
async fn pull(
    State(core): State<Core>,
    caller: Caller,
    JsonBody(body): JsonBody<PullRequest>,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let request = Request::ImagePull {
        reference: body.reference,
        system: body.system,
        events: tx,
    };
    progress_stream(core, caller, request, rx)
}

/// Streams NDJSON progress, as a pull does; the push goes on in its own task.
async fn push(
    State(core): State<Core>,
    caller: Caller,
    JsonBody(body): JsonBody<PushRequest>,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let request = Request::ImagePush {
        reference: body.reference,
        events: tx,
    };
    progress_stream(core, caller, request, rx)
}

/// Runs `request` in its own task and answers with the events it sends on `rx`, one JSON
/// object a line.
fn progress_stream(
    core: Core,
    caller: Caller,
    request: Request,
    rx: tokio::sync::mpsc::Receiver<container_api::image::PullEvent>,
) -> Response {
    tokio::spawn(async move {
        let _ = core.handle(&caller, request).await;
    });
    let mut rx = rx;
    let lines = futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).map(|event| {
        let mut line = serde_json::to_vec(&event).expect("events serialise");
        line.push(b'\n');
        Ok::<_, std::io::Error>(line)
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response()
}

async fn login(
    State(core): State<Core>,
    caller: Caller,
    JsonBody(body): JsonBody<LoginRequest>,
) -> Response {
    answer(&core, &caller, Request::RegistryLogin(body)).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogoutBody {
    server: String,
}

async fn logout(
    State(core): State<Core>,
    caller: Caller,
    JsonBody(body): JsonBody<LogoutBody>,
) -> Response {
    answer(&core, &caller, Request::RegistryLogout(body.server)).await
}

async fn load(
    State(core): State<Core>,
    caller: Caller,
    Query(q): Query<LoadQuery>,
    body: Body,
) -> Response {
    use futures::TryStreamExt;
    let stream = body.into_data_stream().map_err(std::io::Error::other);
    let archive = Box::new(tokio_util::io::StreamReader::new(stream));
    answer(
        &core,
        &caller,
        Request::ImageLoad {
            archive,
            system: q.system,
        },
    )
    .await
}

async fn save(
    State(core): State<Core>,
    caller: Caller,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Response {
    // `reference` repeats, which serde's map-shaped Query cannot hold.
    let references: Vec<String> = form_pairs(query.as_deref().unwrap_or(""))
        .into_iter()
        .filter(|(k, _)| k == "reference")
        .map(|(_, v)| v)
        .collect();
    match core.handle(&caller, Request::ImageSave(references)).await {
        Ok(crate::core::Reply::Stream(s)) => (
            [(header::CONTENT_TYPE, "application/x-tar")],
            Body::from_stream(tokio_util::io::ReaderStream::new(s.0)),
        )
            .into_response(),
        Ok(_) => super::ApiResponseError(container_api::ApiError::internal("unexpected reply"))
            .into_response(),
        Err(e) => super::ApiResponseError(e).into_response(),
    }
}

fn form_pairs(query: &str) -> Vec<(String, String)> {
    serde_urlencoded::from_str::<Vec<(String, String)>>(query).unwrap_or_default()
}
