//! The router's behaviour without a socket: authentication, routes, response shapes, errors.
#![allow(clippy::unwrap_used)]

mod common;

use axum::http::StatusCode;
use serde_json::{Value, json};

fn j(b: &[u8]) -> Value {
    serde_json::from_slice(b).unwrap()
}

#[tokio::test]
async fn api_key_guards_v1_but_not_health_or_the_page() {
    let dir = tempfile::tempdir().unwrap();
    let state = common::tiny_state(dir.path(), Some("sekret"));
    let (s, b) = common::call(&state, "GET", "/v1/models", vec![], None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(j(&b)["error"]["code"], "invalid_api_key");
    let (s, _) = common::call(&state, "GET", "/v1/models", vec![], Some("wrong")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, b) = common::call(&state, "GET", "/v1/models", vec![], Some("sekret")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(j(&b)["data"][0]["id"], "tiny");
    for path in ["/healthcheck", "/metrics", "/", "/assets/app.js"] {
        let (s, _) = common::call(&state, "GET", path, vec![], None).await;
        assert_eq!(s, StatusCode::OK, "{path}");
    }
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_in_openai_shape() {
    let dir = tempfile::tempdir().unwrap();
    let state = common::tiny_state(dir.path(), None);
    let (s, b) = common::call(&state, "GET", "/v1/nothing", vec![], None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(
        j(&b)["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/v1/nothing")
    );
    let (s, b) = common::call(&state, "GET", "/v1/chat/completions", vec![], None).await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(j(&b)["error"]["code"], "method_not_allowed");
    let (s, b) = common::call(&state, "GET", "/v1/models/other", vec![], None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(j(&b)["error"]["code"], "model_not_found");
    let (s, _) = common::call(&state, "GET", "/assets/nope.js", vec![], None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn chat_response_has_openai_shape() {
    let dir = tempfile::tempdir().unwrap();
    let state = common::tiny_state(dir.path(), None);
    let req = json!({"model": "tiny", "messages": [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}],
        "max_completion_tokens": 5, "temperature": 0, "user": "u1"});
    let (s, b) = common::call(
        &state,
        "POST",
        "/v1/chat/completions",
        req.to_string().into_bytes(),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    let v = j(&b);
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert!(v["created"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(v["choices"][0]["logprobs"], Value::Null);
}

#[tokio::test]
async fn stream_is_server_sent_events_ending_in_done() {
    let dir = tempfile::tempdir().unwrap();
    let state = common::tiny_state(dir.path(), None);
    let req = json!({"model": "tiny", "prompt": "abc", "max_tokens": 3, "stream": true, "echo": true,
        "stream_options": {"include_usage": true}});
    let (s, b) = common::call(
        &state,
        "POST",
        "/v1/completions",
        req.to_string().into_bytes(),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let text = String::from_utf8(b).unwrap();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| j(e.strip_prefix("data: ").unwrap().as_bytes()))
        .collect();
    assert_eq!(chunks[0]["choices"][0]["text"], "abc", "echo comes first");
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], 3);
    assert_eq!(chunks.last().unwrap()["choices"], json!([]));
}

#[tokio::test]
async fn unsupported_features_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let state = common::tiny_state(dir.path(), None);
    let base = json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]});
    for (field, value) in [
        ("n", json!(3)),
        (
            "tools",
            json!([{"type": "function", "function": {"name": "f"}}]),
        ),
        ("response_format", json!({"type": "json_object"})),
        ("logit_bias", json!({"5": 10})),
        ("top_logprobs", json!(3)),
    ] {
        let mut req = base.clone();
        req[field] = value;
        let (s, b) = common::call(
            &state,
            "POST",
            "/v1/chat/completions",
            req.to_string().into_bytes(),
            None,
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{field}");
        assert_eq!(
            j(&b)["error"]["param"],
            field,
            "{field}: {}",
            String::from_utf8_lossy(&b)
        );
    }
}
