//! Choosing the next token from logits: penalties, temperature, top-k, top-p, min-p, and a seeded
//! random generator so that a seed reproduces a run exactly.

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};

/// Sampling settings of one request. The defaults sample from the model's distribution as is.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingParams {
    /// Softmax temperature; 0 picks the most likely token (greedy).
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (0: off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1: off).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` × the most likely one (0: off).
    pub min_p: f32,
    /// Divide positive logits (multiply negative ones) of tokens already in the context (1: off).
    pub repetition_penalty: f32,
    /// Subtract from the logits of tokens already generated (OpenAI's `presence_penalty`).
    pub presence_penalty: f32,
    /// Subtract, per occurrence, from tokens already generated (OpenAI's `frequency_penalty`).
    pub frequency_penalty: f32,
    /// Seed of the random generator; `None` draws one.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..Default::default()
        }
    }

    /// Checks every value is in range; the error names the setting.
    pub fn validate(&self) -> Result<()> {
        let bad = |name: &str, v: f32, range: &str| {
            Err(Error::Invalid(format!(
                "`{name}` is {v}; it must be {range}"
            )))
        };
        if !(self.temperature.is_finite() && (0.0..=100.0).contains(&self.temperature)) {
            return bad("temperature", self.temperature, "between 0 and 100");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", self.top_p, "greater than 0 and at most 1");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", self.min_p, "between 0 and 1");
        }
        if !(self.repetition_penalty.is_finite()
            && self.repetition_penalty > 0.0
            && self.repetition_penalty <= 10.0)
        {
            return bad(
                "repetition_penalty",
                self.repetition_penalty,
                "greater than 0 and at most 10",
            );
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return bad(
                "presence_penalty",
                self.presence_penalty,
                "between -2 and 2",
            );
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return bad(
                "frequency_penalty",
                self.frequency_penalty,
                "between -2 and 2",
            );
        }
        Ok(())
    }
}

/// Samples tokens for one sequence.
///
/// The random draw for the `n`-th generated token comes from its own ChaCha stream of the seed,
/// so a sampler rebuilt from the prompt and the tokens generated so far (after a node failure,
/// on another node) continues exactly as the original would have.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    seed: u64,
    draws: u64,
    /// How often each token has been generated so far.
    generated: HashMap<u32, u32>,
    /// Every token of the context (prompt and generated), for the repetition penalty.
    seen: std::collections::HashSet<u32>,
    scratch: Vec<(u32, f32)>,
}

impl Sampler {
    /// A sampler for a sequence that starts with `prompt`.
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Result<Self> {
        Self::resume(params, prompt, &[])
    }

    /// A sampler for a sequence that starts with `prompt` and has already generated `generated`.
    pub fn resume(params: SamplingParams, prompt: &[u32], generated: &[u32]) -> Result<Self> {
        params.validate()?;
        let seed = params.seed.unwrap_or_else(|| rand::rng().random());
        let mut s = Sampler {
            seen: if params.repetition_penalty != 1.0 {
                prompt.iter().copied().collect()
            } else {
                Default::default()
            },
            params,
            seed,
            draws: 0,
            generated: HashMap::new(),
            scratch: Vec::new(),
        };
        for &id in generated {
            s.accept(id);
        }
        Ok(s)
    }

    /// The seed in use (drawn at random when the settings named none).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Records a generated token (for penalties, and to move on to the next random draw).
    pub fn accept(&mut self, id: u32) {
        self.draws += 1;
        *self.generated.entry(id).or_default() += 1;
        if self.params.repetition_penalty != 1.0 {
            self.seen.insert(id);
        }
    }

    /// Chooses the next token from the logits of the last position.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let mut adjusted: Option<Vec<f32>> = None;
        let penalised =
            p.repetition_penalty != 1.0 || p.presence_penalty != 0.0 || p.frequency_penalty != 0.0;
        if penalised {
            let mut l = logits.to_vec();
            if p.repetition_penalty != 1.0 {
                for &id in &self.seen {
                    if let Some(x) = l.get_mut(id as usize) {
                        *x = if *x > 0.0 {
                            *x / p.repetition_penalty
                        } else {
                            *x * p.repetition_penalty
                        };
                    }
                }
            }
            for (&id, &count) in &self.generated {
                if let Some(x) = l.get_mut(id as usize) {
                    *x -= p.presence_penalty + p.frequency_penalty * count as f32;
                }
            }
            adjusted = Some(l);
        }
        let logits = adjusted.as_deref().unwrap_or(logits);
        if p.temperature == 0.0 {
            return argmax(logits);
        }
        let inv_t = 1.0 / p.temperature;
        let c = &mut self.scratch;
        c.clear();
        c.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, x)| x.is_finite())
                .map(|(i, &x)| (i as u32, x * inv_t)),
        );
        if c.is_empty() {
            return argmax(logits);
        }
        let by_logit_desc =
            |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < c.len() {
            c.select_nth_unstable_by(p.top_k - 1, by_logit_desc);
            c.truncate(p.top_k);
        }
        let needs_order = p.top_p < 1.0 || p.min_p > 0.0;
        if needs_order {
            c.sort_unstable_by(by_logit_desc);
        }
        let max = c.iter().map(|x| x.1).fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0f64;
        for x in c.iter_mut() {
            x.1 = (x.1 - max).exp();
            total += f64::from(x.1);
        }
        if p.min_p > 0.0 {
            // The first entry is the most likely, with weight 1 after subtracting the max.
            let floor = p.min_p;
            let keep = c.iter().take_while(|x| x.1 >= floor).count().max(1);
            c.truncate(keep);
            total = c.iter().map(|x| f64::from(x.1)).sum();
        }
        if p.top_p < 1.0 {
            let target = f64::from(p.top_p) * total;
            let mut acc = 0f64;
            let mut keep = c.len();
            for (i, x) in c.iter().enumerate() {
                acc += f64::from(x.1);
                if acc >= target {
                    keep = i + 1;
                    break;
                }
            }
            c.truncate(keep);
            total = c.iter().map(|x| f64::from(x.1)).sum();
        }
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(self.draws);
        let mut r = rng.random::<f64>() * total;
        for x in c.iter() {
            r -= f64::from(x.1);
            if r < 0.0 {
                return x.0;
            }
        }
        c.last().map_or(0, |x| x.0)
    }
}

/// The index of the largest finite value (lowest index on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    best as u32
}

/// Log-probabilities of the model's distribution (before penalties and temperature).
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&x| f64::from((x - max).exp())).sum();
    let log_sum = sum.ln() as f32 + max;
    logits.iter().map(|&x| x - log_sum).collect()
}

/// The `n` most likely tokens and their log-probabilities, most likely first.
pub fn top_logprobs(logprobs: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<(u32, f32)> = logprobs
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l))
        .collect();
    let n = n.min(idx.len());
    if n == 0 {
        return Vec::new();
    }
    let cmp = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    idx.select_nth_unstable_by(n - 1, cmp);
    idx.truncate(n);
    idx.sort_unstable_by(cmp);
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.0, -1.0, 2.5, 0.0]
    }

    #[test]
    fn greedy_picks_argmax() {
        let mut s = Sampler::new(SamplingParams::greedy(), &[]).unwrap();
        assert_eq!(s.sample(&logits()), 1);
    }

    #[test]
    fn a_seed_reproduces_the_sequence() {
        let params = SamplingParams {
            seed: Some(42),
            ..Default::default()
        };
        let draw = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone(), &[]).unwrap();
            (0..50)
                .map(|_| {
                    let id = s.sample(&logits());
                    s.accept(id);
                    id
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(&params), draw(&params));
        let other = SamplingParams {
            seed: Some(43),
            ..params.clone()
        };
        assert_ne!(draw(&params), draw(&other));
    }

    #[test]
    fn a_resumed_sampler_continues_the_same_sequence() {
        let params = SamplingParams {
            seed: Some(9),
            temperature: 1.5,
            ..Default::default()
        };
        let mut s = Sampler::new(params.clone(), &[1, 2]).unwrap();
        let mut out = Vec::new();
        for _ in 0..30 {
            let id = s.sample(&logits());
            s.accept(id);
            out.push(id);
        }
        let mut r = Sampler::resume(params, &[1, 2], &out[..17]).unwrap();
        for &want in &out[17..] {
            let id = r.sample(&logits());
            r.accept(id);
            assert_eq!(id, want);
        }
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_small_is_greedy() {
        for params in [
            SamplingParams {
                top_k: 1,
                seed: Some(1),
                ..Default::default()
            },
            SamplingParams {
                top_p: 0.01,
                seed: Some(1),
                ..Default::default()
            },
            SamplingParams {
                min_p: 0.99,
                seed: Some(1),
                ..Default::default()
            },
        ] {
            let mut s = Sampler::new(params, &[]).unwrap();
            for _ in 0..20 {
                assert_eq!(s.sample(&logits()), 1);
            }
        }
    }

    #[test]
    fn top_k_keeps_only_the_k_best() {
        let mut s = Sampler::new(
            SamplingParams {
                top_k: 2,
                temperature: 5.0,
                seed: Some(3),
                ..Default::default()
            },
            &[],
        )
        .unwrap();
        for _ in 0..200 {
            let id = s.sample(&logits());
            s.accept(id);
            assert!([1, 4].contains(&id));
        }
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let mut s = Sampler::new(
            SamplingParams {
                seed: Some(7),
                ..Default::default()
            },
            &[],
        )
        .unwrap();
        let l = [0.0f32, (3.0f32).ln()];
        let ones = (0..20_000)
            .filter(|_| {
                let id = s.sample(&l);
                s.accept(id);
                id == 1
            })
            .count();
        let frac = ones as f64 / 20_000.0;
        assert!((frac - 0.75).abs() < 0.02, "{frac}");
    }

    #[test]
    fn penalties_move_away_from_repeats() {
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 0.0,
                frequency_penalty: 2.0,
                ..Default::default()
            },
            &[],
        )
        .unwrap();
        s.accept(1);
        // 3.0 - 2.0 = 1.0 < 2.5
        assert_eq!(s.sample(&logits()), 4);
        let mut r = Sampler::new(
            SamplingParams {
                temperature: 0.0,
                repetition_penalty: 2.0,
                ..Default::default()
            },
            &[1],
        )
        .unwrap();
        assert_eq!(r.sample(&logits()), 4);
    }

    #[test]
    fn out_of_range_settings_are_named() {
        let err = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(err.contains("top_p"), "{err}");
        let err = SamplingParams {
            temperature: f32::NAN,
            ..Default::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(err.contains("temperature"), "{err}");
    }

    #[test]
    fn logprobs_are_normalised_and_ordered() {
        let lp = log_softmax(&logits());
        let total: f32 = lp.iter().map(|x| x.exp()).sum();
        assert!((total - 1.0).abs() < 1e-5);
        let top = top_logprobs(&lp, 3);
        assert_eq!(top.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 4, 2]);
    }
}
