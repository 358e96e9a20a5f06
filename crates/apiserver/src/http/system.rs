//! `/v1/system/*` routes.

use axum::Router;
use axum::extract::State;
use axum::response::Response;
use axum::routing::{get, post};

use super::answer;
use crate::core::{Caller, Core, Request};

pub fn routes() -> Router<Core> {
    Router::new()
        .route("/system/status", get(status))
        .route("/system/properties", get(properties))
        .route("/system/shutdown", post(shutdown))
        .route("/system/kernel", post(kernel))
}

async fn status(State(core): State<Core>, caller: Caller) -> Response {
    answer(&core, &caller, Request::SystemStatus).await
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
