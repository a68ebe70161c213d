//! 10,000 malformed or hostile bodies — random bytes, invalid UTF-8, wrong types, huge numbers,
//! deep nesting, 10 MB strings, mutations of valid requests — get 4xx answers (or 200 where a
//! mutation happens to be a valid request), never a 5xx or a panic, and the server keeps serving.
#![allow(clippy::unwrap_used)]

mod common;

use axum::http::StatusCode;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};

fn random_json(rng: &mut ChaCha8Rng, depth: usize) -> Value {
    match rng.random_range(0..if depth > 3 { 6 } else { 8 }) {
        0 => Value::Null,
        1 => json!(rng.random_bool(0.5)),
        2 => json!(rng.random::<i64>()),
        3 => json!(rng.random::<f64>() * 1e300 * if rng.random_bool(0.5) { -1.0 } else { 1.0 }),
        4 => json!(
            ["", "a", "user", "tiny", "\u{0}", "💥", "<|im_end|>", "   "][rng.random_range(0..8)]
        ),
        5 => json!(rng.random_range(-3i64..100)),
        6 => Value::Array(
            (0..rng.random_range(0..4))
                .map(|_| random_json(rng, depth + 1))
                .collect(),
        ),
        _ => {
            let keys = [
                "role", "content", "model", "prompt", "messages", "type", "text", "x",
            ];
            Value::Object(
                (0..rng.random_range(0..4))
                    .map(|_| {
                        (
                            keys[rng.random_range(0..keys.len())].to_string(),
                            random_json(rng, depth + 1),
                        )
                    })
                    .collect(),
            )
        }
    }
}

const FIELDS: &[&str] = &[
    "model",
    "messages",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logprobs",
    "top_logprobs",
    "n",
    "echo",
    "user",
    "tools",
    "response_format",
    "logit_bias",
    "suffix",
    "best_of",
];

fn valid(chat: bool) -> Value {
    if chat {
        json!({"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4})
    } else {
        json!({"model": "tiny", "prompt": "hello", "max_tokens": 4})
    }
}

fn hostile_number(rng: &mut ChaCha8Rng) -> &'static str {
    [
        "1e999",
        "-1e999",
        "18446744073709551616",
        "-9223372036854775809",
        "1e308",
        "-0",
        "0.0000001",
        "NaN",
        "Infinity",
        "99999999999999999999999999",
    ][rng.random_range(0..10)]
}

/// One body; the flag says whether it may legitimately be a valid request.
fn body(rng: &mut ChaCha8Rng, i: usize) -> (Vec<u8>, bool) {
    let chat = rng.random_bool(0.5);
    match i % 10 {
        0 => (
            (0..rng.random_range(0..300))
                .map(|_| rng.random::<u8>())
                .collect(),
            false,
        ),
        1 => {
            // Invalid UTF-8 inside a string.
            let mut b =
                br#"{"model": "tiny", "messages": [{"role": "user", "content": "ab"#.to_vec();
            b.extend_from_slice(&[[0xff, 0xfe][rng.random_range(0..2)], 0xc3, 0x28, 0xa0, 0xa1]);
            b.extend_from_slice(br#""}]}"#);
            (b, false)
        }
        2 => {
            // Deep nesting of arrays or objects, in a field or as the whole body.
            let depth = rng.random_range(100..20_000);
            let (open, close) = if rng.random_bool(0.5) {
                ("[", "]")
            } else {
                ("{\"a\":", "}")
            };
            let nested = format!("{}1{}", open.repeat(depth), close.repeat(depth));
            let text = if rng.random_bool(0.5) {
                format!("{{\"model\": \"tiny\", \"messages\": {nested}}}")
            } else {
                nested
            };
            (text.into_bytes(), false)
        }
        3 => {
            // A hostile number in a numeric field.
            let field = [
                "max_tokens",
                "temperature",
                "top_p",
                "seed",
                "top_k",
                "logprobs",
                "n",
                "presence_penalty",
            ][rng.random_range(0..8)];
            let mut v = valid(chat).to_string();
            v.pop();
            // Some (tiny or zero values) are legitimate for some fields.
            (
                format!("{v}, \"{field}\": {}}}", hostile_number(rng)).into_bytes(),
                true,
            )
        }
        4 | 5 => {
            // A valid request with one field replaced by a random value.
            let mut v = valid(chat);
            let field = FIELDS[rng.random_range(0..FIELDS.len())];
            v[field] = random_json(rng, 0);
            (v.to_string().into_bytes(), true)
        }
        6 => {
            // A valid request with one field removed.
            let mut v = valid(chat);
            let obj = v.as_object_mut().unwrap();
            let keys: Vec<String> = obj.keys().cloned().collect();
            let key = keys[rng.random_range(0..keys.len())].clone();
            obj.remove(&key);
            // Without `max_tokens` the request is still valid.
            (v.to_string().into_bytes(), key == "max_tokens")
        }
        7 => (random_json(rng, 0).to_string().into_bytes(), false),
        8 => {
            // Truncated JSON.
            let v = valid(chat).to_string();
            let cut = rng.random_range(0..v.len());
            (v.as_bytes()[..cut].to_vec(), false)
        }
        _ => {
            // Message-level nonsense: bad roles, content parts of unknown types, empty lists.
            let messages = match rng.random_range(0..5) {
                0 => json!([]),
                1 => json!([{"role": "wizard", "content": "hi"}]),
                2 => {
                    json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
                }
                3 => json!([{"role": "user", "content": [{"type": "text"}]}]),
                _ => json!([{"content": "no role"}]),
            };
            (
                json!({"model": "tiny", "messages": messages})
                    .to_string()
                    .into_bytes(),
                false,
            )
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_hostile_bodies_get_4xx_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let state = common::tiny_state(dir.path(), None);
    let mut rng = ChaCha8Rng::seed_from_u64(2024);
    let mut counts = std::collections::BTreeMap::new();
    for i in 0..10_000 {
        let (b, may_be_valid) = body(&mut rng, i);
        let path = if rng.random_bool(0.5) {
            "/v1/chat/completions"
        } else {
            "/v1/completions"
        };
        let (status, resp) = common::call(&state, "POST", path, b.clone(), None).await;
        *counts.entry(status.as_u16()).or_insert(0) += 1;
        let ok = status.is_client_error() || (may_be_valid && status == StatusCode::OK);
        assert!(
            ok,
            "body #{i} to {path} got {status}: {}\nbody: {}",
            String::from_utf8_lossy(&resp),
            String::from_utf8_lossy(&b[..b.len().min(300)])
        );
        if status.is_client_error() {
            let v: Value = serde_json::from_slice(&resp)
                .unwrap_or_else(|_| panic!("#{i}: error body is not JSON"));
            assert!(v["error"]["message"].is_string(), "#{i}: {v}");
        }
    }
    // 10 MB strings in every string field that takes text.
    let big = "x".repeat(10 << 20);
    for (path, v) in [
        (
            "/v1/chat/completions",
            json!({"model": "tiny", "messages": [{"role": "user", "content": big}]}),
        ),
        ("/v1/completions", json!({"model": "tiny", "prompt": big})),
        (
            "/v1/chat/completions",
            json!({"model": big, "messages": []}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stop": big}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "tiny", "messages": [{"role": big, "content": "hi"}]}),
        ),
    ] {
        let t = std::time::Instant::now();
        let (status, resp) =
            common::call(&state, "POST", path, v.to_string().into_bytes(), None).await;
        assert!(
            status.is_client_error(),
            "10 MB string to {path}: {status} {}",
            String::from_utf8_lossy(&resp[..resp.len().min(300)])
        );
        assert!(
            t.elapsed().as_secs() < 20,
            "10 MB string took {:?}",
            t.elapsed()
        );
    }
    eprintln!("status counts: {counts:?}");
    // Still serving.
    let (status, resp) = common::call(
        &state,
        "POST",
        "/v1/chat/completions",
        valid(true).to_string().into_bytes(),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&resp));
    let (status, _) = common::call(&state, "GET", "/healthcheck", Vec::new(), None).await;
    assert_eq!(status, StatusCode::OK);
}
