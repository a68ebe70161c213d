//! The generation loop shared by every way of running a model: prefill the prompt in chunks,
//! then decode token by token, sampling, detokenizing incrementally, and stopping on an end
//! token, a stop string or the token limit. What runs the layers is behind [`StepRunner`]: the
//! whole model in this process, or (in `llmesh-cluster`) a pipeline across nodes.

use std::time::Instant;

use crate::error::{Error, Result};
pub use crate::head::TokenLogprob;
use crate::head::{HeadSpec, SequenceHead, StepOutput};
use crate::kv_cache::KvCache;
use crate::model::{Shard, ShardInput};
use crate::sampling::SamplingParams;
use crate::tokenizer::Tokenizer;

/// Runs the model's layers on the next positions of one sequence, and its head: the runner is
/// set up for one request (its sampling settings included) and chooses the next token itself.
pub trait StepRunner {
    /// Processes `tokens` after the positions already processed; with `sample`, returns the
    /// next token.
    fn step(&mut self, tokens: &[u32], sample: bool) -> Result<StepOutput>;

    /// The most positions a sequence may have.
    fn context_length(&self) -> usize;
}

/// A whole model in this process with the state of one sequence.
pub struct LocalRunner<'a> {
    shard: &'a Shard,
    cache: KvCache,
    head: SequenceHead,
}

impl<'a> LocalRunner<'a> {
    /// A runner over `shard`, which must hold every layer, set up for `req`.
    pub fn new(shard: &'a Shard, req: &GenerateRequest) -> Result<Self> {
        Self::with_head(shard, &req.head_spec())
    }

    /// A runner over `shard` whose head is rebuilt from `spec` (e.g. to replay a sequence).
    pub fn with_head(shard: &'a Shard, spec: &HeadSpec) -> Result<Self> {
        if !(shard.is_first() && shard.is_last()) {
            return Err(Error::Invalid(format!(
                "a local runner needs the whole model, this shard holds layers {}",
                shard.range()
            )));
        }
        Ok(LocalRunner {
            shard,
            cache: shard.new_cache(),
            head: SequenceHead::new(spec)?,
        })
    }
}

impl StepRunner for LocalRunner<'_> {
    fn step(&mut self, tokens: &[u32], sample: bool) -> Result<StepOutput> {
        let logits = self
            .shard
            .forward(
                &mut self.cache,
                ShardInput::Tokens(tokens),
                self.head.logits_for(),
            )?
            .into_logits()?;
        self.head.process(&logits, tokens, sample)
    }

    fn context_length(&self) -> usize {
        self.cache.max_len()
    }
}

/// One generation request.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// How to choose tokens.
    pub sampling: SamplingParams,
    /// Texts that end generation (not included in the output).
    pub stop: Vec<String>,
    /// Token ids that end generation (EOS, end of turn).
    pub stop_ids: Vec<u32>,
    /// With `Some(n)`: report each generated token's log-probability and the `n` most likely.
    pub logprobs: Option<usize>,
    /// Also compute the log-probability of each prompt token.
    pub prompt_logprobs: bool,
    /// Prompt tokens per prefill step.
    pub prefill_chunk: usize,
}

impl GenerateRequest {
    /// The head settings of this request (before any token is generated).
    pub fn head_spec(&self) -> HeadSpec {
        HeadSpec {
            sampling: self.sampling.clone(),
            logprobs: self.logprobs,
            prompt_logprobs: self.prompt_logprobs,
            prompt: self.prompt.clone(),
            generated: Vec::new(),
        }
    }

    /// A request with default settings for `prompt`.
    pub fn new(prompt: Vec<u32>, max_tokens: usize) -> Self {
        GenerateRequest {
            prompt,
            max_tokens,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            stop_ids: Vec::new(),
            logprobs: None,
            prompt_logprobs: false,
            prefill_chunk: 512,
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end token or a stop string.
    Stop,
    /// The token limit.
    Length,
    /// The caller asked to stop.
    Cancelled,
}

impl FinishReason {
    /// The OpenAI name (`stop`, `length`); a cancelled request reports `stop`.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop | FinishReason::Cancelled => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// One generated token, as reported while generating.
#[derive(Debug, Clone)]
pub struct TokenEvent {
    /// The token.
    pub id: u32,
    /// Text that became final with this token (may be empty, e.g. inside a multi-byte
    /// character or a possible stop string).
    pub text: String,
    /// Log-probabilities, when asked for.
    pub logprob: Option<TokenLogprob>,
}

/// The result of a generation.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated text (without a matched stop string or end token).
    pub text: String,
    /// Generated token ids (including an end token that stopped generation).
    pub token_ids: Vec<u32>,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Log-probabilities of the generated tokens, when asked for.
    pub logprobs: Vec<TokenLogprob>,
    /// Log-probability of each prompt token given the ones before (`None` for the first).
    pub prompt_logprobs: Option<Vec<Option<TokenLogprob>>>,
    /// Seconds spent on the prompt (to the first sampled token).
    pub prefill_seconds: f64,
    /// Seconds spent generating after the first token.
    pub decode_seconds: f64,
}

impl Generation {
    /// Prompt tokens per second.
    pub fn prefill_tokens_per_s(&self) -> f64 {
        rate(self.prompt_tokens, self.prefill_seconds)
    }

    /// Generated tokens per second after the first.
    pub fn decode_tokens_per_s(&self) -> f64 {
        rate(self.token_ids.len().saturating_sub(1), self.decode_seconds)
    }
}

fn rate(n: usize, secs: f64) -> f64 {
    if secs > 0.0 { n as f64 / secs } else { 0.0 }
}

/// Holds back text that could be the start of a stop string and cuts at a complete one.
struct StopFilter<'a> {
    stops: &'a [String],
    text: String,
    emitted: usize,
}

impl<'a> StopFilter<'a> {
    fn new(stops: &'a [String]) -> Self {
        StopFilter {
            stops,
            text: String::new(),
            emitted: 0,
        }
    }

    /// Adds text; returns the newly final text and whether a stop string was found.
    fn push(&mut self, chunk: &str) -> (String, bool) {
        let search_from = floor_char_boundary(
            &self.text,
            self.emitted
                .saturating_sub(self.stops.iter().map(String::len).max().unwrap_or(0)),
        );
        self.text.push_str(chunk);
        let found = self
            .stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| {
                self.text[search_from..]
                    .find(s.as_str())
                    .map(|p| p + search_from)
            })
            .min();
        if let Some(at) = found {
            self.text.truncate(at);
            let out = self.text[self.emitted.min(at)..].to_string();
            self.emitted = at;
            return (out, true);
        }
        let held = self
            .stops
            .iter()
            .map(|s| longest_suffix_prefix(&self.text, s))
            .max()
            .unwrap_or(0);
        let safe = floor_char_boundary(&self.text, self.text.len() - held).max(self.emitted);
        let out = self.text[self.emitted..safe].to_string();
        self.emitted = safe;
        (out, false)
    }

    fn finish(&mut self) -> String {
        let out = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        out
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    (1..stop.len().min(text.len() + 1))
        .rev()
        .find(|&n| stop.is_char_boundary(n) && text.ends_with(&stop[..n]))
        .unwrap_or(0)
}

/// Generates from `req.prompt`, calling `on_token` for each token; `on_token` returns `false`
/// to stop early.
pub fn generate(
    runner: &mut dyn StepRunner,
    tokenizer: &Tokenizer,
    req: &GenerateRequest,
    on_token: &mut dyn FnMut(&TokenEvent) -> bool,
) -> Result<Generation> {
    if req.prompt.is_empty() {
        return Err(Error::Invalid("the prompt is empty".into()));
    }
    let needed = req.prompt.len() + req.max_tokens;
    if needed > runner.context_length() {
        return Err(Error::ContextLength {
            prompt: req.prompt.len(),
            max_tokens: req.max_tokens,
            needed,
            context: runner.context_length(),
        });
    }
    let start = Instant::now();
    let mut prompt_logprobs: Option<Vec<Option<TokenLogprob>>> =
        req.prompt_logprobs.then(|| vec![None]);
    let chunk = req.prefill_chunk.max(1);
    let n_chunks = req.prompt.len().div_ceil(chunk);
    let mut next = None;
    for (c, part) in req.prompt.chunks(chunk).enumerate() {
        let out = runner.step(part, c + 1 == n_chunks && req.max_tokens > 0)?;
        if let Some(pl) = prompt_logprobs.as_mut() {
            pl.extend(out.prompt_logprobs.into_iter().map(Some));
        }
        next = out.sampled;
    }
    let mut decode_start = None;
    let mut prefill_seconds = 0.0;
    let mut detok = tokenizer.detokenizer(&req.prompt, true);
    let mut filter = StopFilter::new(&req.stop);
    let mut token_ids = Vec::new();
    let mut logprobs = Vec::new();
    let mut finish = FinishReason::Length;
    for step in 0..req.max_tokens {
        let Some(sampled) = next.take() else {
            return Err(Error::Invalid("the model runner returned no token".into()));
        };
        let id = sampled.id;
        token_ids.push(id);
        if step == 0 {
            prefill_seconds = start.elapsed().as_secs_f64();
            decode_start = Some(Instant::now());
        }
        let logprob = sampled.logprob;
        if let Some(lp) = &logprob {
            logprobs.push(lp.clone());
        }
        let is_end = req.stop_ids.contains(&id);
        let is_last = step + 1 == req.max_tokens;
        // An end token adds no text; the last token releases whatever was held back.
        let mut piece = if is_end {
            String::new()
        } else {
            detok.step(id)?
        };
        if is_end || is_last {
            piece.push_str(&detok.flush()?);
        }
        let (mut text, hit_stop) = filter.push(&piece);
        if (is_end || is_last) && !hit_stop {
            text.push_str(&filter.finish());
        }
        let keep_going = on_token(&TokenEvent { id, text, logprob });
        if is_end || hit_stop {
            finish = FinishReason::Stop;
            break;
        }
        if !keep_going {
            finish = FinishReason::Cancelled;
            break;
        }
        if is_last {
            break;
        }
        next = runner.step(&[id], true)?.sampled;
    }
    Ok(Generation {
        text: filter.text,
        token_ids,
        finish_reason: finish,
        prompt_tokens: req.prompt.len(),
        logprobs,
        prompt_logprobs,
        prefill_seconds,
        decode_seconds: decode_start.map_or(0.0, |d| d.elapsed().as_secs_f64()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], chunks: &[&str]) -> (Vec<String>, bool, String) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut f = StopFilter::new(&stops);
        let mut out = Vec::new();
        for c in chunks {
            let (t, hit) = f.push(c);
            out.push(t);
            if hit {
                return (out, true, f.text);
            }
        }
        out.push(f.finish());
        (out, false, f.text)
    }

    #[test]
    fn stop_strings_split_across_tokens_are_found_and_held_back() {
        let (out, hit, text) = run(&["END"], &["hello E", "N", "D more"]);
        assert!(hit);
        assert_eq!(text, "hello ");
        assert_eq!(out.concat(), "hello ");
        assert_eq!(out[0], "hello ");
    }

    #[test]
    fn a_false_start_is_released() {
        let (out, hit, text) = run(&["END"], &["a E", "x"]);
        assert!(!hit);
        assert_eq!(text, "a Ex");
        assert_eq!(out.concat(), "a Ex");
        assert_eq!(out[0], "a ");
    }

    #[test]
    fn multibyte_text_is_never_cut_inside_a_character() {
        let (out, hit, _) = run(&["é!"], &["café", " ok"]);
        assert!(!hit);
        assert_eq!(out.concat(), "café ok");
    }
}
