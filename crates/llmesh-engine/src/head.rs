//! What the last shard does with a sequence's logits: choose the next token and compute
//! log-probabilities. It lives wherever the output head runs — in this process for a local model,
//! on the last hop of a cluster's pipeline — so only token ids travel back, never logits.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::model::LogitsFor;
use crate::sampling::{Sampler, SamplingParams, log_softmax, top_logprobs};

/// A token's log-probability and the most likely alternatives at its position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    /// The token.
    pub id: u32,
    /// Its log-probability.
    pub logprob: f32,
    /// The most likely tokens at this position, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// How a sequence's head is set up; enough to rebuild it elsewhere.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadSpec {
    /// Sampling settings, with the seed fixed so that a rebuilt head draws the same numbers.
    pub sampling: SamplingParams,
    /// Report generated tokens' log-probabilities with this many alternatives.
    pub logprobs: Option<usize>,
    /// Report the log-probabilities of prompt tokens (with `logprobs` alternatives).
    pub prompt_logprobs: bool,
    /// The prompt (for the repetition penalty).
    pub prompt: Vec<u32>,
    /// Tokens generated before this head was built (after a replay).
    pub generated: Vec<u32>,
}

/// The next token chosen by a step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sampled {
    /// The token.
    pub id: u32,
    /// Its log-probability, when asked for.
    pub logprob: Option<TokenLogprob>,
}

/// What one step of a sequence produced.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepOutput {
    /// The next token, when the step asked for one.
    pub sampled: Option<Sampled>,
    /// Log-probabilities of prompt tokens that became known in this step.
    pub prompt_logprobs: Vec<TokenLogprob>,
}

/// Sampling and log-probability state of one sequence.
#[derive(Debug, Clone)]
pub struct SequenceHead {
    sampler: Sampler,
    logprobs: Option<usize>,
    prompt_logprobs: bool,
    generating: bool,
    /// Log-probabilities at the last prompt position seen, waiting for the next prompt token.
    pending: Option<Vec<f32>>,
}

impl SequenceHead {
    /// A head as `spec` describes.
    pub fn new(spec: &HeadSpec) -> Result<Self> {
        Ok(SequenceHead {
            sampler: Sampler::resume(spec.sampling.clone(), &spec.prompt, &spec.generated)?,
            logprobs: spec.logprobs,
            prompt_logprobs: spec.prompt_logprobs,
            generating: !spec.generated.is_empty(),
            pending: None,
        })
    }

    /// Which positions' logits the next step needs.
    pub fn logits_for(&self) -> LogitsFor {
        if self.prompt_logprobs && !self.generating {
            LogitsFor::All
        } else {
            LogitsFor::Last
        }
    }

    /// Consumes the logits of a step over `tokens` (one row, or one per token as
    /// [`Self::logits_for`] asked) and, with `sample`, chooses the next token.
    pub fn process(&mut self, logits: &Tensor, tokens: &[u32], sample: bool) -> Result<StepOutput> {
        let rows = logits.dim(0)?;
        let mut out = StepOutput::default();
        let top_n = self.logprobs.unwrap_or(0);
        if self.prompt_logprobs && !self.generating && rows == tokens.len() {
            let lp_of = |lp: &[f32], id: u32| TokenLogprob {
                id,
                logprob: lp.get(id as usize).copied().unwrap_or(f32::NEG_INFINITY),
                top: top_logprobs(lp, top_n),
            };
            if let (Some(prev), Some(&first)) = (self.pending.take(), tokens.first()) {
                out.prompt_logprobs.push(lp_of(&prev, first));
            }
            for i in 0..rows {
                let lp = log_softmax(&logits.get(i)?.to_vec1::<f32>()?);
                match tokens.get(i + 1) {
                    Some(&next) => out.prompt_logprobs.push(lp_of(&lp, next)),
                    None => self.pending = Some(lp),
                }
            }
        }
        if sample {
            let last = logits.get(rows - 1)?.to_vec1::<f32>()?;
            let id = self.sampler.sample(&last);
            self.sampler.accept(id);
            let logprob = self.logprobs.map(|n| {
                let lp = log_softmax(&last);
                TokenLogprob {
                    id,
                    logprob: lp[id as usize],
                    top: top_logprobs(&lp, n),
                }
            });
            self.generating = true;
            self.pending = None;
            out.sampled = Some(Sampled { id, logprob });
        }
        Ok(out)
    }
}
