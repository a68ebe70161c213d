//! Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the status
//! code the official clients map to their exception classes. Internal errors are logged in full
//! and reported to the client without internals.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An error answered to an API client.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Human-readable message.
    pub message: String,
    /// OpenAI's `type`.
    pub kind: &'static str,
    /// The request field at fault.
    pub param: Option<String>,
    /// OpenAI's `code`.
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400: a field is missing, of the wrong type, or out of range.
    pub fn invalid(message: impl Into<String>, param: impl Into<Option<String>>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.into(),
            code: None,
        }
    }

    /// 400 with a specific code.
    pub fn invalid_code(
        message: impl Into<String>,
        param: Option<&str>,
        code: &'static str,
    ) -> Self {
        ApiError {
            code: Some(code),
            ..Self::invalid(message, param.map(str::to_string))
        }
    }

    /// 404 `model_not_found`.
    pub fn model_not_found(model: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{model}` does not exist or you do not have access to it."),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        }
    }

    /// 404 for an unknown path.
    pub fn not_found(path: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("Unknown request URL: {path}"),
            kind: "invalid_request_error",
            param: None,
            code: Some("unknown_url"),
        }
    }

    /// 401 `invalid_api_key`.
    pub fn unauthorized() -> Self {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: "Incorrect or missing API key. Send `Authorization: Bearer <key>` with the key given to `llmesh run --api-key`.".into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
        }
    }

    /// 503: every worker is busy and the queue is full.
    pub fn overloaded(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: Some("overloaded"),
        }
    }

    /// 503: the model cannot run now (a cluster lost nodes, or is still forming).
    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError {
            code: Some("model_unavailable"),
            ..Self::overloaded(message)
        }
    }

    /// 500: our fault. The details go to the log, not to the client.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!("internal error: {detail}");
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message:
                "The server had an error while processing your request; see its log for details."
                    .into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// Maps an engine error to what the client should see.
pub fn from_engine(e: &llmesh_engine::Error, param: &str) -> ApiError {
    use llmesh_engine::Error as E;
    match e {
        E::ContextLength { .. } => {
            ApiError::invalid_code(e.to_string(), Some(param), "context_length_exceeded")
        }
        E::Invalid(msg) => ApiError::invalid(msg.clone(), None),
        E::Unavailable(msg) => ApiError::unavailable(msg.clone()),
        E::Template(msg) => ApiError::invalid(
            format!("the chat template failed on these messages: {msg}"),
            Some("messages".into()),
        ),
        E::Tokenizer(msg) => ApiError::invalid(
            format!("could not tokenize the input: {msg}"),
            Some(param.to_string()),
        ),
        other => ApiError::internal(other),
    }
}
