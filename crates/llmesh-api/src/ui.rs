//! The chat page: static files embedded in the binary, so installing llmesh needs no web build.

use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

struct Asset {
    name: &'static str,
    mime: &'static str,
    body: &'static [u8],
}

const ASSETS: &[Asset] = &[
    Asset {
        name: "app.js",
        mime: "text/javascript; charset=utf-8",
        body: include_bytes!("../ui/app.js"),
    },
    Asset {
        name: "style.css",
        mime: "text/css; charset=utf-8",
        body: include_bytes!("../ui/style.css"),
    },
    Asset {
        name: "marked.umd.js",
        mime: "text/javascript; charset=utf-8",
        body: include_bytes!("../ui/vendor/marked.umd.js"),
    },
    Asset {
        name: "purify.min.js",
        mime: "text/javascript; charset=utf-8",
        body: include_bytes!("../ui/vendor/purify.min.js"),
    },
    Asset {
        name: "highlight.min.js",
        mime: "text/javascript; charset=utf-8",
        body: include_bytes!("../ui/vendor/highlight.min.js"),
    },
    Asset {
        name: "github-dark.min.css",
        mime: "text/css; charset=utf-8",
        body: include_bytes!("../ui/vendor/github-dark.min.css"),
    },
];

const INDEX: &str = include_str!("../ui/index.html");

fn with_headers(mime: &'static str, body: &'static [u8], cache: &'static str) -> Response {
    let mut r = (StatusCode::OK, body).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(mime));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// `GET /`.
pub async fn index() -> Response {
    with_headers("text/html; charset=utf-8", INDEX.as_bytes(), "no-cache")
}

/// `GET /assets/{name}`.
pub async fn asset(Path(name): Path<String>) -> Response {
    match ASSETS.iter().find(|a| a.name == name) {
        Some(a) => with_headers(a.mime, a.body, "public, max-age=3600"),
        None => ApiError::not_found(&format!("/assets/{name}")).into_response(),
    }
}
