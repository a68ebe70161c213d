//! llmesh's HTTP face: an OpenAI-compatible API (`/v1/chat/completions`, `/v1/completions`,
//! `/v1/models`), the cluster's topology, health, Prometheus metrics, and the chat page.
//!
//! The API talks to an [`InferenceService`]: it validates and tokenizes requests, queues them
//! and turns the service's events into OpenAI's JSON and server-sent events. It does not know
//! whether the layers run in this process or across a cluster. Servers are built with
//! [`app`], so tests can drive the router without a socket.

#![deny(missing_docs)]

pub mod body;
pub mod error;
pub mod metrics;
mod openai;
pub mod types;
mod ui;

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use llmesh_engine::service::{InferenceService, ModelHandle};
use serde_json::json;

use crate::error::ApiError;
use crate::metrics::Metrics;

/// Everything a request handler needs.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

struct Inner {
    service: Arc<dyn InferenceService>,
    api_key: Option<String>,
    metrics: Metrics,
    started: std::time::Instant,
}

impl AppState {
    /// State over `service`; with `api_key`, every `/v1` request must carry it.
    pub fn new(service: Arc<dyn InferenceService>, api_key: Option<String>) -> Self {
        AppState(Arc::new(Inner {
            service,
            api_key: api_key.filter(|k| !k.is_empty()),
            metrics: Metrics::default(),
            started: std::time::Instant::now(),
        }))
    }

    fn service(&self) -> &Arc<dyn InferenceService> {
        &self.0.service
    }

    fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    fn model(&self, id: &str) -> Result<Arc<ModelHandle>, ApiError> {
        self.service()
            .models()
            .into_iter()
            .find(|m| m.id == id)
            .ok_or_else(|| ApiError::model_not_found(id))
    }
}

/// The router: API, health, metrics and the chat page.
pub fn app(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/chat/completions", post(openai::chat))
        .route("/completions", post(openai::completions))
        .route("/models", get(list_models))
        .route("/models/{*id}", get(get_model))
        .route("/topology", get(topology))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .nest("/v1", v1)
        .route("/healthcheck", get(health))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/", get(ui::index))
        .route("/assets/{name}", get(ui::asset))
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(tower_http::cors::CorsLayer::permissive())
        .with_state(state)
}

async fn require_key(
    State(state): State<AppState>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    if let Some(key) = &state.0.api_key {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes())) {
            state.metrics().request("unauthorized", 401);
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn model_object(m: &ModelHandle) -> serde_json::Value {
    json!({"id": m.id, "object": "model", "created": m.created, "owned_by": "llmesh", "meta": m.meta})
}

async fn list_models(State(state): State<AppState>) -> Response {
    let data: Vec<_> = state
        .service()
        .models()
        .iter()
        .map(|m| model_object(m))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn get_model(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    match state.model(&id) {
        Ok(m) => axum::Json(model_object(&m)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn topology(State(state): State<AppState>) -> Response {
    axum::Json(state.service().topology()).into_response()
}

async fn health(State(state): State<AppState>) -> Response {
    let h = state.service().health();
    let status = if h.ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if h.ok { "ok" } else { "unavailable" },
        "running": h.running,
        "queued": h.queued,
        "reason": h.reason,
        "uptime_s": state.0.started.elapsed().as_secs(),
        "models": state.service().models().iter().map(|m| m.id.clone()).collect::<Vec<_>>(),
    });
    (status, axum::Json(body)).into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    let h = state.service().health();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics().render(h.queued, h.running),
    )
        .into_response()
}

async fn unknown_route(req: Request) -> Response {
    ApiError::not_found(req.uri().path()).into_response()
}

async fn method_not_allowed(req: Request) -> Response {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        message: format!("{} is not allowed on {}", req.method(), req.uri().path()),
        kind: "invalid_request_error",
        param: None,
        code: Some("method_not_allowed"),
    }
    .into_response()
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets requests in flight finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown)
        .await
}
