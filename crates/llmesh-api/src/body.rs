//! Reading a JSON request body: bounded in size, parsed once, and deserialised with the path of
//! the offending field in the error (`messages[2].content: invalid type ...`).

use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 32 << 20;

/// A JSON body deserialised into `T`, with OpenAI-style errors.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::to_bytes(req.into_body(), MAX_BODY_BYTES)
            .await
            .map_err(|_| ApiError {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                message: format!(
                    "the request body is larger than {} MiB",
                    MAX_BODY_BYTES >> 20
                ),
                kind: "invalid_request_error",
                param: None,
                code: Some("request_too_large"),
            })?;
        parse(&bytes).map(JsonBody)
    }
}

/// Parses a body; public for the tests.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.is_empty() {
        return Err(ApiError::invalid(
            "the request body is empty; send a JSON object",
            None,
        ));
    }
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::invalid(format!("the request body is not valid JSON: {e}"), None))?;
    if !value.is_object() {
        return Err(ApiError::invalid(
            "the request body must be a JSON object",
            None,
        ));
    }
    typed(&value)
}

/// Deserialises a parsed value, naming the path of the offending field.
pub fn typed<T: DeserializeOwned>(value: &serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if path == "." {
            ApiError::invalid(inner, None)
        } else {
            ApiError::invalid(format!("{path}: {inner}"), Some(path))
        }
    })
}
