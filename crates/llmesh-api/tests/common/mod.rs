//! A tiny served model and request helpers for the API tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use llmesh_api::{AppState, app};
use llmesh_engine::service::{LocalService, ModelHandle};
use llmesh_engine::synth::{SynthSpec, make_model};
use llmesh_engine::{Architecture, ModelFiles};
use tower::ServiceExt;

/// A state over a one-layer model with a 64-token context, so any generation is short.
pub fn tiny_state(dir: &std::path::Path, api_key: Option<&str>) -> AppState {
    let mut spec = SynthSpec::new(Architecture::Qwen2);
    spec.layers = 1;
    spec.hidden = 64;
    spec.heads = 2;
    spec.kv_heads = 1;
    spec.head_dim = 32;
    spec.intermediate = 128;
    spec.context = 64;
    let out = dir.join("tiny");
    make_model(&spec, &out).unwrap();
    let files = ModelFiles::open(&out).unwrap();
    let shard = files.load_full().unwrap();
    let handle = ModelHandle::from_files("tiny", &files);
    let service = LocalService::new(handle, shard, 2, 16, "test".into());
    AppState::new(Arc::new(service), api_key.map(str::to_string))
}

/// Sends a request through the router (no socket) and returns status and body.
pub async fn call(
    state: &AppState,
    method: &str,
    path: &str,
    body: Vec<u8>,
    auth: Option<&str>,
) -> (StatusCode, Vec<u8>) {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json");
    if let Some(key) = auth {
        req = req.header("authorization", format!("Bearer {key}"));
    }
    let resp = app(state.clone())
        .oneshot(req.body(Body::from(body)).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let bytes = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        resp.into_body().collect(),
    )
    .await
    .expect("response body in time")
    .unwrap()
    .to_bytes()
    .to_vec();
    (status, bytes)
}
