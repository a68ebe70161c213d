//! `POST /v1/chat/completions` and `POST /v1/completions`: validate, template, tokenize, queue on
//! the inference service, and answer with one JSON object or a stream of server-sent events, in
//! exactly the shapes OpenAI's API uses.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use futures::stream;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use llmesh_engine::generate::{Generation, TokenEvent, TokenLogprob};
use llmesh_engine::service::{JobEvent, ModelHandle, SubmitError};
use llmesh_engine::{GenerateRequest, Message};

use crate::AppState;
use crate::body::JsonBody;
use crate::error::{ApiError, from_engine};
use crate::types::{
    ChatRequest, CompletionRequest, Content, Prompt, parse_request, refuse_unsupported,
};

/// `chatcmpl-…` / `cmpl-…` ids.
fn new_id(prefix: &str) -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let tail: String = (0..24)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
        .collect();
    format!("{prefix}-{tail}")
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

const FINGERPRINT: &str = concat!("llmesh-", env!("CARGO_PKG_VERSION"));

/// What kind of answer a request gets.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

/// A validated request, ready to queue.
struct Job {
    kind: Kind,
    model: Arc<ModelHandle>,
    req: GenerateRequest,
    stream: bool,
    include_usage: bool,
    /// Completions with `echo`: the prompt's text (and log-probabilities if asked) come first.
    echo: Option<String>,
    /// Leading prompt tokens that are not part of the echoed text (a BOS llmesh added).
    echo_skip: usize,
    started: Instant,
}

async fn tokenize(
    model: &Arc<ModelHandle>,
    text: String,
    add_special: bool,
    param: &'static str,
) -> Result<Vec<u32>, ApiError> {
    let m = model.clone();
    tokio::task::spawn_blocking(move || m.tokenizer.encode(&text, add_special))
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| from_engine(&e, param))
}

fn context_error(model: &ModelHandle, prompt: usize, completion: usize, param: &str) -> ApiError {
    ApiError::invalid_code(
        format!(
            "This model's maximum context length is {} tokens. However, you requested {} tokens ({prompt} in the {}, {completion} in the completion). Please reduce the length of the {} or completion.",
            model.context_length,
            prompt + completion,
            if param == "messages" {
                "messages"
            } else {
                "prompt"
            },
            if param == "messages" {
                "messages"
            } else {
                "prompt"
            },
        ),
        Some(param),
        "context_length_exceeded",
    )
}

/// Refuses a text that cannot fit in the context whatever its tokens, without tokenizing it.
fn precheck_length(model: &ModelHandle, chars: usize, param: &str) -> Result<(), ApiError> {
    let min_tokens = chars / model.max_token_chars;
    if min_tokens >= model.context_length {
        return Err(context_error(model, min_tokens, 0, param));
    }
    Ok(())
}

fn max_tokens(
    model: &ModelHandle,
    asked: Option<u64>,
    prompt: usize,
    param: &str,
    field: &str,
) -> Result<usize, ApiError> {
    let room = model.context_length.saturating_sub(prompt);
    match asked {
        Some(0) => Err(ApiError::invalid(
            format!("`{field}` must be at least 1"),
            Some(field.to_string()),
        )),
        Some(n) if n as u128 + prompt as u128 > model.context_length as u128 => Err(context_error(
            model,
            prompt,
            usize::try_from(n).unwrap_or(usize::MAX),
            param,
        )),
        Some(n) => Ok(n as usize),
        None if room == 0 => Err(context_error(model, prompt, 1, param)),
        None => Ok(room),
    }
}

fn messages(req: &ChatRequest) -> Result<Vec<Message>, ApiError> {
    if req.messages.is_empty() {
        return Err(ApiError::invalid(
            "`messages` must hold at least one message",
            Some("messages".into()),
        ));
    }
    req.messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                r @ ("user" | "assistant" | "tool") => r,
                other => {
                    return Err(ApiError::invalid(
                        format!("messages[{i}].role: `{other}` is not one of system, developer, user, assistant, tool"),
                        Some(format!("messages[{i}].role")),
                    ));
                }
            };
            let text = match &m.content {
                None => String::new(),
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => text.push_str(t),
                            ("text", None) => {
                                return Err(ApiError::invalid(
                                    format!("messages[{i}].content[{j}]: a text part needs `text`"),
                                    Some(format!("messages[{i}].content[{j}].text")),
                                ));
                            }
                            (other, _) => {
                                return Err(ApiError::invalid(
                                    format!("messages[{i}].content[{j}]: content parts of type `{other}` are not supported; only `text`"),
                                    Some(format!("messages[{i}].content[{j}].type")),
                                ));
                            }
                        }
                    }
                    text
                }
            };
            Ok(Message::new(role, text))
        })
        .collect()
}

fn submit(state: &AppState, job: &Job) -> Result<mpsc::Receiver<JobEvent>, ApiError> {
    state
        .service()
        .submit(&job.model.id, job.req.clone())
        .map_err(|e| match e {
            SubmitError::UnknownModel(m) => ApiError::model_not_found(&m),
            SubmitError::Overloaded(_) => ApiError::overloaded(e.to_string()),
            SubmitError::Unavailable(_) => ApiError::unavailable(e.to_string()),
        })
}

/// `POST /v1/chat/completions`.
pub async fn chat(
    State(state): State<AppState>,
    body: Result<JsonBody<Value>, ApiError>,
) -> Response {
    serve::<ChatRequest, _, _>(state, body, "chat_completions", prepare_chat).await
}

/// `POST /v1/completions`.
pub async fn completions(
    State(state): State<AppState>,
    body: Result<JsonBody<Value>, ApiError>,
) -> Response {
    serve::<CompletionRequest, _, _>(state, body, "completions", prepare_completion).await
}

/// Parses, prepares and answers one request, counting it in the metrics.
async fn serve<T, F, Fut>(
    state: AppState,
    body: Result<JsonBody<Value>, ApiError>,
    endpoint: &'static str,
    prepare: F,
) -> Response
where
    T: crate::types::WithCommon,
    F: FnOnce(AppState, T, Instant) -> Fut,
    Fut: std::future::Future<Output = Result<Job, ApiError>>,
{
    let _in_flight = state.metrics().start();
    let started = Instant::now();
    let job = match body.and_then(|JsonBody(v)| parse_request::<T>(&v)) {
        Ok(req) => prepare(state.clone(), req, started).await,
        Err(e) => Err(e),
    };
    let resp = match job {
        Ok(job) => answer(state.clone(), job).await,
        Err(e) => e.into_response(),
    };
    state.metrics().request(endpoint, resp.status().as_u16());
    resp
}

async fn prepare_chat(
    state: AppState,
    req: ChatRequest,
    started: Instant,
) -> Result<Job, ApiError> {
    refuse_unsupported(&req)?;
    let sampling = req.common.sampling()?;
    let stop = req.common.stop_strings()?;
    let (stream, include_usage) = req.common.streaming();
    let logprobs = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
        (_, Some(n)) if n > 20 => {
            return Err(ApiError::invalid(
                "`top_logprobs` must be between 0 and 20",
                Some("top_logprobs".into()),
            ));
        }
        (true, n) => Some(n.unwrap_or(0) as usize),
        (false, Some(_)) => {
            return Err(ApiError::invalid(
                "`top_logprobs` needs `logprobs` set to true",
                Some("top_logprobs".into()),
            ));
        }
        (false, None) => None,
    };
    let model = state.model(&req.model)?;
    let template = model.chat_template.as_ref().ok_or_else(|| {
        ApiError::invalid(
            format!(
                "the model `{}` has no chat template; use /v1/completions",
                model.id
            ),
            Some("model".into()),
        )
    })?;
    let messages = messages(&req)?;
    precheck_length(
        &model,
        messages.iter().map(|m| m.content.chars().count()).sum(),
        "messages",
    )?;
    let text = template
        .render(&messages, true)
        .map_err(|e| from_engine(&e, "messages"))?;
    let prompt = tokenize(&model, text, false, "messages").await?;
    let asked = req.max_completion_tokens.or(req.common.max_tokens);
    let field = if req.max_completion_tokens.is_some() {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    let max = max_tokens(&model, asked, prompt.len(), "messages", field)?;
    let mut g = GenerateRequest::new(prompt, max);
    g.sampling = sampling;
    g.stop = stop;
    if !req.common.ignore_eos.unwrap_or(false) {
        g.stop_ids = model.eos_ids.clone();
    }
    g.logprobs = logprobs;
    Ok(Job {
        kind: Kind::Chat,
        model,
        req: g,
        stream,
        include_usage,
        echo: None,
        echo_skip: 0,
        started,
    })
}

async fn prepare_completion(
    state: AppState,
    req: CompletionRequest,
    started: Instant,
) -> Result<Job, ApiError> {
    let sampling = req.common.sampling()?;
    let stop = req.common.stop_strings()?;
    let (stream, include_usage) = req.common.streaming();
    if req.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid(
            "`suffix` is not supported",
            Some("suffix".into()),
        ));
    }
    if req.best_of.is_some_and(|b| b != 1) {
        return Err(ApiError::invalid(
            "`best_of` must be 1",
            Some("best_of".into()),
        ));
    }
    let logprobs = match req.logprobs {
        Some(n) if n > 20 => {
            return Err(ApiError::invalid(
                "`logprobs` must be between 0 and 20",
                Some("logprobs".into()),
            ));
        }
        n => n.map(|n| n as usize),
    };
    let model = state.model(&req.model)?;
    let one = |n: usize| {
        if n == 1 {
            Ok(())
        } else {
            Err(ApiError::invalid(
                format!("`prompt` holds {n} prompts; send one per request"),
                Some("prompt".into()),
            ))
        }
    };
    enum Input {
        Text(String),
        Ids(Vec<u32>),
    }
    let input = match req.prompt {
        Prompt::Text(t) => Input::Text(t),
        Prompt::Texts(mut v) => {
            one(v.len())?;
            Input::Text(v.pop().unwrap_or_default())
        }
        Prompt::Tokens(ids) => Input::Ids(ids),
        Prompt::TokenLists(mut v) => {
            one(v.len())?;
            Input::Ids(v.pop().unwrap_or_default())
        }
    };
    // Text is tokenized with the BOS the tokenizer's configuration asks for; token ids are
    // taken as they are.
    let (prompt_ids, text, echo_skip) = match input {
        Input::Text(t) => {
            precheck_length(&model, t.chars().count(), "prompt")?;
            let ids = tokenize(&model, t.clone(), true, "prompt").await?;
            // A BOS the tokenizer added is not part of the text to echo.
            let bos = model.tokenizer.bos_token();
            let added_bos = bos.is_some_and(|b| {
                !t.starts_with(b) && ids.first().copied() == model.tokenizer.token_id(b)
            });
            (ids, Some(t), usize::from(added_bos))
        }
        Input::Ids(ids) => (ids, None, 0),
    };
    if prompt_ids.is_empty() {
        return Err(ApiError::invalid(
            "`prompt` is empty",
            Some("prompt".into()),
        ));
    }
    let vocab = model.tokenizer.vocab_size();
    if let Some(bad) = prompt_ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(ApiError::invalid(
            format!("token id {bad} in `prompt` is not in the vocabulary of {vocab} tokens"),
            Some("prompt".into()),
        ));
    }
    let max = max_tokens(
        &model,
        Some(req.common.max_tokens.unwrap_or(16)),
        prompt_ids.len(),
        "prompt",
        "max_tokens",
    )?;
    let echo = match (req.echo.unwrap_or(false), text) {
        (false, _) => None,
        (true, Some(t)) => Some(t),
        (true, None) => Some(
            model
                .tokenizer
                .decode(&prompt_ids, false)
                .map_err(|e| from_engine(&e, "prompt"))?,
        ),
    };
    let mut g = GenerateRequest::new(prompt_ids, max);
    g.sampling = sampling;
    g.stop = stop;
    if !req.common.ignore_eos.unwrap_or(false) {
        g.stop_ids = model.eos_ids.clone();
    }
    g.logprobs = logprobs;
    g.prompt_logprobs = echo.is_some() && logprobs.is_some();
    Ok(Job {
        kind: Kind::Completion,
        model,
        req: g,
        stream,
        include_usage,
        echo,
        echo_skip,
        started,
    })
}

async fn answer(state: AppState, job: Job) -> Response {
    let rx = match submit(&state, &job) {
        Ok(rx) => rx,
        Err(e) => return e.into_response(),
    };
    if job.stream {
        return stream_response(state, job, rx);
    }
    match collect(rx).await {
        Ok((first_token, g)) => {
            record(&state, &job, first_token, &g);
            axum::Json(full_body(&job, &g)).into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// Waits for the end of a generation; returns when the first token came and the result.
async fn collect(
    mut rx: mpsc::Receiver<JobEvent>,
) -> Result<(Option<Instant>, Generation), ApiError> {
    let mut first = None;
    while let Some(ev) = rx.recv().await {
        match ev {
            JobEvent::Token(_) => {
                first.get_or_insert_with(Instant::now);
            }
            JobEvent::Done(g) => return Ok((first, g)),
            JobEvent::Failed(e) => return Err(from_engine(&e, "messages")),
        }
    }
    Err(ApiError::internal(
        "the generation worker stopped without an answer",
    ))
}

fn record(state: &AppState, job: &Job, first_token: Option<Instant>, g: &Generation) {
    let ttft = first_token.map_or(0.0, |t| (t - job.started).as_secs_f64());
    state.metrics().generation(
        g.prompt_tokens,
        g.token_ids.len(),
        ttft,
        g.decode_tokens_per_s(),
    );
}

fn usage(g: &Generation) -> Value {
    json!({
        "prompt_tokens": g.prompt_tokens,
        "completion_tokens": g.token_ids.len(),
        "total_tokens": g.prompt_tokens + g.token_ids.len(),
    })
}

fn token_text(model: &ModelHandle, id: u32) -> (String, Vec<u8>) {
    let bytes = model.tokenizer.token_bytes(id);
    (String::from_utf8_lossy(&bytes).into_owned(), bytes)
}

/// Chat `logprobs.content` entries for generated tokens (end tokens excluded).
fn chat_logprobs(model: &ModelHandle, lps: &[TokenLogprob], stop_ids: &[u32]) -> Value {
    let content: Vec<Value> = lps
        .iter()
        .filter(|lp| !stop_ids.contains(&lp.id))
        .map(|lp| {
            let (token, bytes) = token_text(model, lp.id);
            let top: Vec<Value> = lp
                .top
                .iter()
                .map(|(id, l)| {
                    let (t, b) = token_text(model, *id);
                    json!({"token": t, "logprob": l, "bytes": b})
                })
                .collect();
            json!({"token": token, "logprob": lp.logprob, "bytes": bytes, "top_logprobs": top})
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// Legacy completion `logprobs`: parallel arrays, with text offsets counted from `offset`.
fn completion_logprobs(
    model: &ModelHandle,
    lps: &[Option<&TokenLogprob>],
    ids: &[u32],
    offset: usize,
) -> Value {
    let mut tokens = Vec::new();
    let mut token_logprobs = Vec::new();
    let mut top = Vec::new();
    let mut offsets = Vec::new();
    let mut at = offset;
    for (lp, id) in lps.iter().zip(ids) {
        let (t, _) = token_text(model, *id);
        offsets.push(at);
        at += t.len();
        tokens.push(t);
        match lp {
            Some(lp) => {
                token_logprobs.push(json!(lp.logprob));
                let mut m = serde_json::Map::new();
                for (tid, l) in &lp.top {
                    m.insert(token_text(model, *tid).0, json!(l));
                }
                top.push(Value::Object(m));
            }
            None => {
                token_logprobs.push(Value::Null);
                top.push(Value::Null);
            }
        }
    }
    json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets})
}

fn full_body(job: &Job, g: &Generation) -> Value {
    let model = &job.model;
    match job.kind {
        Kind::Chat => {
            let logprobs = if job.req.logprobs.is_some() {
                chat_logprobs(model, &g.logprobs, &job.req.stop_ids)
            } else {
                Value::Null
            };
            json!({
                "id": new_id("chatcmpl"),
                "object": "chat.completion",
                "created": unix_now(),
                "model": model.id,
                "system_fingerprint": FINGERPRINT,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": g.text, "refusal": null},
                    "logprobs": logprobs,
                    "finish_reason": g.finish_reason.as_str(),
                }],
                "usage": usage(g),
            })
        }
        Kind::Completion => {
            let echo = job.echo.clone().unwrap_or_default();
            let logprobs = if job.req.logprobs.is_some() {
                let (mut lps, mut ids): (Vec<Option<&TokenLogprob>>, Vec<u32>) =
                    (Vec::new(), Vec::new());
                if job.echo.is_some() {
                    let prompt_lps = g.prompt_logprobs.as_deref().unwrap_or(&[]);
                    for (i, id) in job.req.prompt.iter().enumerate().skip(job.echo_skip) {
                        lps.push(prompt_lps.get(i).and_then(Option::as_ref));
                        ids.push(*id);
                    }
                }
                for lp in g
                    .logprobs
                    .iter()
                    .filter(|lp| !job.req.stop_ids.contains(&lp.id))
                {
                    lps.push(Some(lp));
                    ids.push(lp.id);
                }
                completion_logprobs(model, &lps, &ids, 0)
            } else {
                Value::Null
            };
            json!({
                "id": new_id("cmpl"),
                "object": "text_completion",
                "created": unix_now(),
                "model": model.id,
                "system_fingerprint": FINGERPRINT,
                "choices": [{
                    "index": 0,
                    "text": format!("{echo}{}", g.text),
                    "logprobs": logprobs,
                    "finish_reason": g.finish_reason.as_str(),
                }],
                "usage": usage(g),
            })
        }
    }
}

/// Turns job events into server-sent events.
struct Chunker {
    state: AppState,
    job: Job,
    id: String,
    created: u64,
    first_token: Option<Instant>,
    text_len: usize,
}

impl Chunker {
    fn chunk(&self, choice: Value, usage: Option<Value>) -> Event {
        let object = if self.job.kind == Kind::Chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let mut v = json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.job.model.id,
            "system_fingerprint": FINGERPRINT,
            "choices": if choice.is_null() { json!([]) } else { json!([choice]) },
        });
        if self.job.include_usage {
            v["usage"] = usage.unwrap_or(Value::Null);
        }
        Event::default().data(v.to_string())
    }

    fn opening(&mut self) -> Vec<Event> {
        match self.job.kind {
            Kind::Chat => vec![self.chunk(
                json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}),
                None,
            )],
            Kind::Completion => match self.job.echo.clone() {
                Some(text) => {
                    self.text_len = text.len();
                    vec![self.chunk(json!({"index": 0, "text": text, "logprobs": null, "finish_reason": null}), None)]
                }
                None => Vec::new(),
            },
        }
    }

    fn token(&mut self, ev: TokenEvent) -> Vec<Event> {
        self.first_token.get_or_insert_with(Instant::now);
        let is_end = self.job.req.stop_ids.contains(&ev.id);
        let logprob = ev.logprob.filter(|_| !is_end);
        if ev.text.is_empty() && logprob.is_none() {
            return Vec::new();
        }
        let model = &self.job.model;
        let choice = match self.job.kind {
            Kind::Chat => {
                let lp = logprob.map_or(Value::Null, |lp| {
                    chat_logprobs(model, std::slice::from_ref(&lp), &[])
                });
                json!({"index": 0, "delta": {"content": ev.text}, "logprobs": lp, "finish_reason": null})
            }
            Kind::Completion => {
                let lp = logprob.map_or(Value::Null, |lp| {
                    completion_logprobs(model, &[Some(&lp)], &[lp.id], self.text_len)
                });
                self.text_len += ev.text.len();
                json!({"index": 0, "text": ev.text, "logprobs": lp, "finish_reason": null})
            }
        };
        vec![self.chunk(choice, None)]
    }

    fn done(&mut self, g: Generation) -> Vec<Event> {
        record(&self.state, &self.job, self.first_token, &g);
        let reason = g.finish_reason.as_str();
        let last = match self.job.kind {
            Kind::Chat => {
                json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": reason})
            }
            Kind::Completion => {
                json!({"index": 0, "text": "", "logprobs": null, "finish_reason": reason})
            }
        };
        let mut out = vec![self.chunk(last, None)];
        if self.job.include_usage {
            out.push(self.chunk(Value::Null, Some(usage(&g))));
        }
        out.push(Event::default().data("[DONE]"));
        out
    }

    fn failed(&mut self, e: ApiError) -> Vec<Event> {
        vec![
            Event::default().data(e.body().to_string()),
            Event::default().data("[DONE]"),
        ]
    }
}

fn stream_response(state: AppState, job: Job, rx: mpsc::Receiver<JobEvent>) -> Response {
    let mut chunker = Chunker {
        state,
        id: new_id(if job.kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        }),
        created: unix_now(),
        job,
        first_token: None,
        text_len: 0,
    };
    let opening = chunker.opening();
    // The stream owns the receiver: when the client goes away, the body is dropped, the
    // receiver with it, and the worker stops at its next token.
    let rest = stream::unfold(Some((rx, chunker)), |st| async move {
        let (mut rx, mut chunker) = st?;
        match rx.recv().await {
            Some(JobEvent::Token(ev)) => {
                let events = chunker.token(ev);
                Some((events, Some((rx, chunker))))
            }
            Some(JobEvent::Done(g)) => Some((chunker.done(g), None)),
            Some(JobEvent::Failed(e)) => Some((chunker.failed(from_engine(&e, "messages")), None)),
            None => Some((
                chunker.failed(ApiError::internal("the generation worker stopped")),
                None,
            )),
        }
    })
    .flat_map(stream::iter);
    let events = stream::iter(opening)
        .chain(rest)
        .map(Ok::<Event, Infallible>);
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}
