//! Request bodies of the OpenAI endpoints, and the checks that turn them into engine requests.
//! Every field OpenAI defines is either honoured or refused with a 400 that names it.

use serde::Deserialize;
use serde_json::Value;

use llmesh_engine::SamplingParams;

use crate::error::ApiError;

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a string or an array of strings")]
pub enum Stop {
    /// A single stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with token usage.
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// Sampling and limits shared by chat and completions.
#[derive(Debug, Default, Deserialize)]
pub struct Common {
    /// Stream server-sent events.
    pub stream: Option<bool>,
    /// Options for streaming.
    pub stream_options: Option<StreamOptions>,
    /// Most tokens to generate.
    pub max_tokens: Option<u64>,
    /// Sampling temperature, 0 to 2.
    pub temperature: Option<f64>,
    /// Nucleus sampling.
    pub top_p: Option<f64>,
    /// Seed for reproducible sampling.
    pub seed: Option<i64>,
    /// Stop strings.
    pub stop: Option<Stop>,
    /// OpenAI's presence penalty, -2 to 2.
    pub presence_penalty: Option<f64>,
    /// OpenAI's frequency penalty, -2 to 2.
    pub frequency_penalty: Option<f64>,
    /// Number of choices (only 1).
    pub n: Option<u64>,
    /// End-user id (accepted, unused).
    pub user: Option<String>,
    /// Extension: keep the k most likely tokens.
    pub top_k: Option<u64>,
    /// Extension: min-p sampling.
    pub min_p: Option<f64>,
    /// Extension: repetition penalty.
    pub repetition_penalty: Option<f64>,
    /// Extension: keep generating past end-of-sequence tokens (for benchmarks).
    pub ignore_eos: Option<bool>,
    /// Token biases (refused unless empty).
    pub logit_bias: Option<serde_json::Map<String, Value>>,
}

fn range(
    name: &str,
    v: Option<f64>,
    lo: f64,
    hi: f64,
    lo_open: bool,
) -> Result<Option<f32>, ApiError> {
    match v {
        None => Ok(None),
        Some(x) if x.is_finite() && x <= hi && (x > lo || (!lo_open && x == lo)) => {
            Ok(Some(x as f32))
        }
        Some(x) => Err(ApiError::invalid(
            format!(
                "{x} is not a valid value for `{name}`: it must be {}{lo} and at most {hi}",
                if lo_open {
                    "greater than "
                } else {
                    "at least "
                }
            ),
            Some(name.to_string()),
        )),
    }
}

impl Common {
    /// Validated sampling settings. OpenAI's defaults: temperature 1, top_p 1.
    pub fn sampling(&self) -> Result<SamplingParams, ApiError> {
        if let Some(n) = self.n
            && n != 1
        {
            return Err(ApiError::invalid(
                format!("`n` = {n} is not supported; llmesh returns one choice per request"),
                Some("n".into()),
            ));
        }
        if self.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
            return Err(ApiError::invalid(
                "`logit_bias` is not supported",
                Some("logit_bias".into()),
            ));
        }
        let top_k = match self.top_k {
            Some(k) if k > 1_000_000 => {
                return Err(ApiError::invalid(
                    format!("`top_k` = {k} is too large"),
                    Some("top_k".into()),
                ));
            }
            Some(k) => k as usize,
            None => 0,
        };
        Ok(SamplingParams {
            temperature: range("temperature", self.temperature, 0.0, 2.0, false)?.unwrap_or(1.0),
            top_p: range("top_p", self.top_p, 0.0, 1.0, true)?.unwrap_or(1.0),
            top_k,
            min_p: range("min_p", self.min_p, 0.0, 1.0, false)?.unwrap_or(0.0),
            repetition_penalty: range(
                "repetition_penalty",
                self.repetition_penalty,
                0.0,
                10.0,
                true,
            )?
            .unwrap_or(1.0),
            presence_penalty: range("presence_penalty", self.presence_penalty, -2.0, 2.0, false)?
                .unwrap_or(0.0),
            frequency_penalty: range(
                "frequency_penalty",
                self.frequency_penalty,
                -2.0,
                2.0,
                false,
            )?
            .unwrap_or(0.0),
            seed: self.seed.map(|s| s as u64),
        })
    }

    /// Validated stop strings.
    pub fn stop_strings(&self) -> Result<Vec<String>, ApiError> {
        let list = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if list.len() > 16 {
            return Err(ApiError::invalid(
                "`stop` may hold at most 16 strings",
                Some("stop".into()),
            ));
        }
        if list.iter().any(|s| s.is_empty() || s.len() > 1024) {
            return Err(ApiError::invalid(
                "each `stop` string must be 1 to 1024 bytes",
                Some("stop".into()),
            ));
        }
        Ok(list)
    }

    /// Whether to stream, and whether to send usage at the end of a stream.
    pub fn streaming(&self) -> (bool, bool) {
        let stream = self.stream.unwrap_or(false);
        let usage = stream
            && self
                .stream_options
                .as_ref()
                .and_then(|o| o.include_usage)
                .unwrap_or(false);
        (stream, usage)
    }
}

/// A chat message's content: text, or a list of parts of which only text is supported.
#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a string or an array of content parts")]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Content parts.
    Parts(Vec<ContentPart>),
}

/// One content part.
#[derive(Debug, Deserialize)]
pub struct ContentPart {
    /// `text` (other types are refused).
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    pub text: Option<String>,
}

/// One message of `messages`.
#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    /// `system`, `developer`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The content (may be null for an assistant message that only called tools).
    pub content: Option<Content>,
    /// Participant name (accepted, unused).
    pub name: Option<String>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    /// Model id.
    pub model: String,
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// Newer name of `max_tokens`.
    pub max_completion_tokens: Option<u64>,
    /// Return log-probabilities of the output tokens.
    pub logprobs: Option<bool>,
    /// How many alternatives per position, 0 to 20.
    pub top_logprobs: Option<u64>,
    /// Tool definitions (refused).
    pub tools: Option<Value>,
    /// Tool choice (refused unless `none`).
    pub tool_choice: Option<Value>,
    /// Legacy functions (refused).
    pub functions: Option<Value>,
    /// Response format (only `text`).
    pub response_format: Option<Value>,
    /// Shared settings (read from the same object by [`parse_request`]).
    #[serde(skip)]
    pub common: Common,
}

/// `prompt` of a completion: text or token ids, alone or in a one-element list.
#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "a string, an array of token ids, or a one-element array of either"
)]
pub enum Prompt {
    /// Text.
    Text(String),
    /// Token ids.
    Tokens(Vec<u32>),
    /// A list of texts (only one supported).
    Texts(Vec<String>),
    /// A list of token lists (only one supported).
    TokenLists(Vec<Vec<u32>>),
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    /// Model id.
    pub model: String,
    /// The prompt.
    pub prompt: Prompt,
    /// Echo the prompt before the completion.
    pub echo: Option<bool>,
    /// Log-probabilities: the number of alternatives per token, 0 to 20.
    pub logprobs: Option<u64>,
    /// Text after the completion (refused).
    pub suffix: Option<String>,
    /// Server-side best-of (only 1).
    pub best_of: Option<u64>,
    /// Shared settings (read from the same object by [`parse_request`]).
    #[serde(skip)]
    pub common: Common,
}

/// A request type with the shared settings.
pub trait WithCommon: serde::de::DeserializeOwned {
    /// Where the shared settings go.
    fn common_mut(&mut self) -> &mut Common;
}

impl WithCommon for ChatRequest {
    fn common_mut(&mut self) -> &mut Common {
        &mut self.common
    }
}

impl WithCommon for CompletionRequest {
    fn common_mut(&mut self) -> &mut Common {
        &mut self.common
    }
}

/// Reads a request and its shared settings from one JSON object, naming the field at fault.
pub fn parse_request<T: WithCommon>(v: &Value) -> Result<T, ApiError> {
    let mut req: T = crate::body::typed(v)?;
    *req.common_mut() = crate::body::typed(v)?;
    Ok(req)
}

/// Refuses a feature the request asks for that llmesh does not provide.
pub fn refuse_unsupported(chat: &ChatRequest) -> Result<(), ApiError> {
    let set = |v: &Option<Value>| v.as_ref().is_some_and(|v| !v.is_null());
    if set(&chat.tools) || set(&chat.functions) {
        return Err(ApiError::invalid(
            "tool calling is not supported yet; send the request without `tools`",
            Some("tools".into()),
        ));
    }
    if let Some(choice) = &chat.tool_choice
        && !choice.is_null()
        && choice.as_str() != Some("none")
    {
        return Err(ApiError::invalid(
            "`tool_choice` is not supported",
            Some("tool_choice".into()),
        ));
    }
    if let Some(fmt) = &chat.response_format
        && !fmt.is_null()
        && fmt.get("type").and_then(Value::as_str) != Some("text")
    {
        return Err(ApiError::invalid(
            "only `response_format` {\"type\": \"text\"} is supported",
            Some("response_format".into()),
        ));
    }
    Ok(())
}
