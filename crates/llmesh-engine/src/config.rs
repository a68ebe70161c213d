//! Model configuration: one runtime description of a decoder-only transformer, read from a Hugging
//! Face `config.json` or from GGUF metadata (see `gguf_model`), validated once so that the model
//! code can trust it.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};

/// The model families llmesh runs. They share one implementation; this enum records what differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Architecture {
    /// Llama 2, 3, 3.1, 3.2, 3.3 (and most "llama-like" models).
    Llama,
    /// Mistral 7B and relatives: Llama with an optional sliding attention window.
    Mistral,
    /// Qwen2 / Qwen2.5: biases on the q, k and v projections.
    Qwen2,
    /// Qwen3: per-head RMSNorm on q and k, and a head size that need not be hidden / heads.
    Qwen3,
}

impl Architecture {
    /// All architectures, for help texts and tests.
    pub const ALL: [Architecture; 4] = [
        Architecture::Llama,
        Architecture::Mistral,
        Architecture::Qwen2,
        Architecture::Qwen3,
    ];

    /// The short name used on the command line and in GGUF `general.architecture`.
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
        }
    }

    /// Parses a short name (`llama`, `mistral`, `qwen2`, `qwen3`).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }

    /// The class name transformers writes in `config.json` `architectures`.
    pub fn hf_class(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Qwen3 => "Qwen3ForCausalLM",
        }
    }

    fn from_hf_class(class: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.hf_class() == class)
    }

    /// The architecture name llama.cpp uses in GGUF files. Mistral models are stored as `llama`.
    pub fn gguf_name(self) -> &'static str {
        match self {
            Architecture::Llama | Architecture::Mistral => "llama",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
        }
    }

    /// Whether llama.cpp's converter permutes the rows of q and k into its interleaved rotary
    /// layout for this architecture (it does for `llama`, which covers Mistral).
    pub fn gguf_permutes_qk(self) -> bool {
        matches!(self, Architecture::Llama | Architecture::Mistral)
    }

    /// Whether the architecture always has biases on q, k and v.
    fn always_qkv_bias(self) -> bool {
        matches!(self, Architecture::Qwen2)
    }

    /// Whether the architecture normalises each head of q and k before the rotary embedding.
    pub fn has_qk_norm(self) -> bool {
        matches!(self, Architecture::Qwen3)
    }
}

impl std::fmt::Display for Architecture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How rotary position frequencies are scaled for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Positions divided by `factor`.
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        /// Scale for low frequencies.
        factor: f64,
        /// Wavelength threshold (as a fraction of the original context) above which the full
        /// factor applies.
        low_freq_factor: f64,
        /// Wavelength threshold below which frequencies are kept.
        high_freq_factor: f64,
        /// The context length the model was first trained with.
        original_max_position_embeddings: f64,
    },
    /// Per-frequency divisors, as GGUF files store them in `rope_freqs.weight`.
    Factors(Vec<f32>),
}

/// Rotary embedding settings.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    /// The base of the geometric frequency sequence.
    pub theta: f64,
    /// Optional long-context scaling.
    pub scaling: Option<RopeScaling>,
}

impl RopeConfig {
    /// The inverse frequencies for a head of `head_dim` dimensions (`head_dim / 2` values).
    pub fn inv_freq(&self, head_dim: usize) -> Vec<f32> {
        let half = head_dim / 2;
        (0..half)
            .map(|i| {
                let freq = 1.0 / self.theta.powf(2.0 * i as f64 / head_dim as f64);
                let scaled = match &self.scaling {
                    None => freq,
                    Some(RopeScaling::Linear { factor }) => freq / factor,
                    Some(RopeScaling::Factors(f)) => freq / f64::from(f[i]),
                    Some(RopeScaling::Llama3 {
                        factor,
                        low_freq_factor,
                        high_freq_factor,
                        original_max_position_embeddings: old,
                    }) => {
                        let wavelen = 2.0 * std::f64::consts::PI / freq;
                        let low_freq_wavelen = old / low_freq_factor;
                        let high_freq_wavelen = old / high_freq_factor;
                        if wavelen < high_freq_wavelen {
                            freq
                        } else if wavelen > low_freq_wavelen {
                            freq / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * freq / factor + smooth * freq
                        }
                    }
                };
                scaled as f32
            })
            .collect()
    }

    /// The per-frequency divisors (`unscaled / scaled`), as llama.cpp stores them in
    /// `rope_freqs.weight`; `None` when there is no frequency-dependent scaling.
    pub fn freq_factors(&self, head_dim: usize) -> Option<Vec<f32>> {
        match self.scaling {
            Some(RopeScaling::Llama3 { .. }) | Some(RopeScaling::Factors(_)) => {
                let plain = RopeConfig {
                    theta: self.theta,
                    scaling: None,
                };
                let base = plain.inv_freq(head_dim);
                let scaled = self.inv_freq(head_dim);
                Some(base.iter().zip(&scaled).map(|(b, s)| b / s).collect())
            }
            _ => None,
        }
    }
}

/// Everything the model code needs to know about a model's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Which family the model belongs to.
    pub arch: Architecture,
    /// Rows of the embedding and output matrices.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's inner layer.
    pub intermediate_size: usize,
    /// Number of transformer blocks.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (fewer than `num_heads` with grouped-query attention).
    pub num_kv_heads: usize,
    /// Size of one head.
    pub head_dim: usize,
    /// Epsilon of every RMSNorm.
    pub rms_norm_eps: f64,
    /// Rotary embedding settings.
    pub rope: RopeConfig,
    /// Longest context the model supports.
    pub max_position_embeddings: usize,
    /// Whether the output head reuses the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Whether q, k and v have biases.
    pub qkv_bias: bool,
    /// Whether attention only looks back this many positions.
    pub sliding_window: Option<usize>,
    /// Token ids that end generation, as the model's config says.
    pub eos_token_ids: Vec<u32>,
    /// The beginning-of-sequence token id, if the config names one.
    pub bos_token_id: Option<u32>,
}

impl ModelConfig {
    /// Bytes of KV cache one position takes in one layer, stored as `kv`.
    pub fn kv_bytes_per_position_layer(&self, kv: crate::KvType) -> usize {
        2 * self.num_kv_heads * self.head_dim * kv.size_in_bytes()
    }

    /// Checks internal consistency; `path` names the file the values came from.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(Error::config(path, format!("`{name}` must be positive")));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(Error::config(
                path,
                format!(
                    "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                    self.num_heads, self.num_kv_heads
                ),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(Error::config(
                path,
                format!(
                    "head_dim ({}) must be even for rotary embeddings",
                    self.head_dim
                ),
            ));
        }
        if let Some(RopeScaling::Factors(f)) = &self.rope.scaling
            && f.len() != self.head_dim / 2
        {
            return Err(Error::config(
                path,
                format!(
                    "rope frequency factors have {} values, head_dim {} needs {}",
                    f.len(),
                    self.head_dim,
                    self.head_dim / 2
                ),
            ));
        }
        if !(self.rope.theta.is_finite() && self.rope.theta > 0.0) {
            return Err(Error::config(path, "rope_theta must be a positive number"));
        }
        Ok(())
    }

    /// Parses a Hugging Face `config.json`.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_hf_json(&text, path)
    }

    /// Parses the text of a Hugging Face `config.json`; `path` is used in error messages.
    pub fn from_hf_json(text: &str, path: &Path) -> Result<Self> {
        let raw: HfConfig = serde_json::from_str(text)
            .map_err(|e| Error::config(path, format!("invalid config.json: {e}")))?;
        let arch = raw.architecture(path)?;
        let num_heads = raw.num_attention_heads;
        let head_dim = match raw.head_dim {
            Some(d) => d,
            None if num_heads > 0 => raw.hidden_size / num_heads,
            None => 0,
        };
        let sliding_window = match arch {
            Architecture::Mistral => raw.sliding_window,
            Architecture::Qwen2 | Architecture::Qwen3 if raw.use_sliding_window == Some(true) => {
                raw.sliding_window
            }
            _ => None,
        };
        let config = ModelConfig {
            arch,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads,
            num_kv_heads: raw.num_key_value_heads.unwrap_or(num_heads),
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope: RopeConfig {
                theta: raw.rope_theta.unwrap_or(10_000.0),
                scaling: parse_rope_scaling(raw.rope_scaling.as_ref(), path)?,
            },
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias: arch.always_qkv_bias() || raw.attention_bias.unwrap_or(false),
            sliding_window,
            eos_token_ids: token_ids(raw.eos_token_id.as_ref()),
            bos_token_id: token_ids(raw.bos_token_id.as_ref()).first().copied(),
        };
        config.validate(path)?;
        Ok(config)
    }

    /// Serialises to a Hugging Face `config.json` (used by the test-model generator and export).
    pub fn to_hf_json(&self) -> Value {
        let mut v = serde_json::json!({
            "architectures": [self.arch.hf_class()],
            "model_type": self.arch.name(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope.theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        });
        let obj = v.as_object_mut().expect("json object");
        if self.arch == Architecture::Llama {
            obj.insert("attention_bias".into(), self.qkv_bias.into());
        }
        if let Some(w) = self.sliding_window {
            obj.insert("sliding_window".into(), w.into());
            if self.arch != Architecture::Mistral {
                obj.insert("use_sliding_window".into(), true.into());
            }
        }
        if let Some(bos) = self.bos_token_id {
            obj.insert("bos_token_id".into(), bos.into());
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [one] => {
                obj.insert("eos_token_id".into(), (*one).into());
            }
            many => {
                obj.insert("eos_token_id".into(), many.into());
            }
        }
        let scaling = match &self.rope.scaling {
            None | Some(RopeScaling::Factors(_)) => Value::Null,
            Some(RopeScaling::Linear { factor }) => {
                serde_json::json!({"rope_type": "linear", "factor": factor})
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => serde_json::json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                // transformers wants an integer here.
                "original_max_position_embeddings": *original_max_position_embeddings as u64,
            }),
        };
        obj.insert("rope_scaling".into(), scaling);
        v
    }

    /// Number of elements of the weights of one transformer block.
    pub fn layer_param_count(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let mut n = h * q + 2 * h * kv + q * h + 3 * h * self.intermediate_size + 2 * h;
        if self.qkv_bias {
            n += q + 2 * kv;
        }
        if self.arch.has_qk_norm() {
            n += 2 * self.head_dim;
        }
        n
    }
}

fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|n| n as u32).into_iter().collect(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|n| n as u32))
            .collect(),
        _ => Vec::new(),
    }
}

fn parse_rope_scaling(v: Option<&Value>, path: &Path) -> Result<Option<RopeScaling>> {
    let Some(Value::Object(obj)) = v else {
        return Ok(None);
    };
    let kind = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |key: &str| -> Result<f64> {
        obj.get(key).and_then(Value::as_f64).ok_or_else(|| {
            Error::config(
                path,
                format!("rope_scaling of type `{kind}` needs a number `{key}`"),
            )
        })
    };
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear {
            factor: num("factor")?,
        })),
        "llama3" => Ok(Some(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        })),
        other => Err(Error::config(
            path,
            format!("rope_scaling type `{other}` is not supported (supported: linear, llama3)"),
        )),
    }
}

#[derive(Deserialize)]
struct HfConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
}

impl HfConfig {
    fn architecture(&self, path: &Path) -> Result<Architecture> {
        if let Some(classes) = &self.architectures
            && let Some(first) = classes.first()
        {
            return Architecture::from_hf_class(first).ok_or_else(|| Error::UnknownArchitecture {
                path: path.to_path_buf(),
                arch: first.clone(),
            });
        }
        match &self.model_type {
            Some(t) => Architecture::from_name(t).ok_or_else(|| Error::UnknownArchitecture {
                path: path.to_path_buf(),
                arch: t.clone(),
            }),
            None => Err(Error::config(
                path,
                "config.json names neither `architectures` nor `model_type`",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_matches_reference_values() {
        // Llama 3.1 8B: factor 8, low 1, high 4, original 8192, theta 500000, head_dim 128.
        let rope = RopeConfig {
            theta: 500_000.0,
            scaling: Some(RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0,
            }),
        };
        let plain = RopeConfig {
            theta: 500_000.0,
            scaling: None,
        };
        let scaled = rope.inv_freq(128);
        let base = plain.inv_freq(128);
        // High frequencies are kept, the lowest are divided by the full factor.
        assert_eq!(scaled[0], base[0]);
        assert!((scaled[63] * 8.0 - base[63]).abs() < 1e-12);
        let factors = rope.freq_factors(128).unwrap();
        assert_eq!(factors[0], 1.0);
        assert!((factors[63] - 8.0).abs() < 1e-4);
        // Round trip through stored factors.
        let stored = RopeConfig {
            theta: 500_000.0,
            scaling: Some(RopeScaling::Factors(factors)),
        };
        for (a, b) in stored.inv_freq(128).iter().zip(&scaled) {
            assert!((a - b).abs() <= 1e-6 * b.abs());
        }
    }

    #[test]
    fn hf_config_round_trips() {
        let cfg = ModelConfig {
            arch: Architecture::Qwen3,
            vocab_size: 100,
            hidden_size: 64,
            intermediate_size: 128,
            num_layers: 3,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 32,
            rms_norm_eps: 1e-6,
            rope: RopeConfig {
                theta: 1e6,
                scaling: None,
            },
            max_position_embeddings: 512,
            tie_word_embeddings: true,
            qkv_bias: false,
            sliding_window: None,
            eos_token_ids: vec![5, 6],
            bos_token_id: None,
        };
        let text = cfg.to_hf_json().to_string();
        let back = ModelConfig::from_hf_json(&text, Path::new("config.json")).unwrap();
        assert_eq!(back, cfg);
    }

    #[test]
    fn bad_configs_name_the_problem() {
        let p = Path::new("/m/config.json");
        let err = ModelConfig::from_hf_json("{", p).unwrap_err().to_string();
        assert!(
            err.starts_with("/m/config.json: invalid config.json"),
            "{err}"
        );
        let err = ModelConfig::from_hf_json(r#"{"architectures":["GPT2LMHeadModel"]}"#, p)
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing field"), "{err}");
        let full = r#"{"architectures":["FalconForCausalLM"],"vocab_size":1,"hidden_size":8,
            "intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2}"#;
        let err = ModelConfig::from_hf_json(full, p).unwrap_err().to_string();
        assert!(
            err.contains("unknown architecture `FalconForCausalLM`"),
            "{err}"
        );
        let heads = r#"{"architectures":["LlamaForCausalLM"],"vocab_size":1,"hidden_size":8,
            "intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":3,"num_key_value_heads":2,"head_dim":2}"#;
        let err = ModelConfig::from_hf_json(heads, p).unwrap_err().to_string();
        assert!(err.contains("not a multiple"), "{err}");
    }
}
