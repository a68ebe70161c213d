//! Tiny random models in the real formats, for tests and benchmarks: a Hugging Face directory
//! (`config.json`, `generation_config.json`, `tokenizer.json`, `tokenizer_config.json`,
//! safetensors, optionally sharded) and GGUF files of the same weights in any storage type. The
//! tokenizer is trained on an embedded corpus; the chat template follows the architecture's
//! usual prompt format. Everything is a pure function of the [`SynthSpec`], seed included.

pub mod templates;
pub mod tokenizer;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use half::{bf16, f16};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde_json::json;

use crate::config::{Architecture, ModelConfig, RopeConfig, RopeScaling};
use crate::error::{Error, Result};
use crate::gguf_export::{FileType, GgufExport};
use crate::safetensors_source::{INDEX_FILE, SINGLE_FILE};
use crate::weights::{LayerWeight, WeightName};
pub use tokenizer::TokenizerStyle;

/// The element type of the safetensors weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StDtype {
    /// 32-bit floats.
    F32,
    /// 16-bit floats.
    F16,
    /// bfloat16.
    BF16,
}

impl StDtype {
    /// Parses `f32`, `f16` or `bf16`.
    pub fn from_name(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Some(StDtype::F32),
            "f16" | "float16" => Some(StDtype::F16),
            "bf16" | "bfloat16" => Some(StDtype::BF16),
            _ => None,
        }
    }
}

/// What model to make.
#[derive(Debug, Clone)]
pub struct SynthSpec {
    /// Architecture.
    pub arch: Architecture,
    /// Transformer blocks.
    pub layers: usize,
    /// Residual width.
    pub hidden: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head size.
    pub head_dim: usize,
    /// MLP width.
    pub intermediate: usize,
    /// Context length.
    pub context: usize,
    /// Approximate vocabulary size (the trained tokenizer decides the exact one).
    pub vocab: usize,
    /// Tokenizer family.
    pub tokenizer: TokenizerStyle,
    /// Whether the output head reuses the embedding.
    pub tie_embeddings: bool,
    /// Whether to use Llama 3.1's rotary scaling.
    pub llama3_rope: bool,
    /// Sliding attention window (Mistral).
    pub sliding_window: Option<usize>,
    /// Random seed of the weights.
    pub seed: u64,
    /// Element type of the safetensors files.
    pub dtype: StDtype,
    /// Number of safetensors files (1: `model.safetensors`; more: an index and shards).
    pub shards: usize,
    /// GGUF files to write alongside.
    pub gguf: Vec<FileType>,
}

impl SynthSpec {
    /// The defaults for an architecture: 4 layers, width 256, grouped-query attention, and the
    /// features that distinguish the architecture switched on.
    pub fn new(arch: Architecture) -> Self {
        let mut s = SynthSpec {
            arch,
            layers: 4,
            hidden: 256,
            heads: 8,
            kv_heads: 2,
            head_dim: 32,
            intermediate: 512,
            context: 2048,
            vocab: 1024,
            tokenizer: TokenizerStyle::Llama3,
            tie_embeddings: false,
            llama3_rope: false,
            sliding_window: None,
            seed: 0,
            dtype: StDtype::F32,
            shards: 1,
            gguf: Vec::new(),
        };
        match arch {
            Architecture::Llama => s.llama3_rope = true,
            Architecture::Mistral => s.tokenizer = TokenizerStyle::Mistral,
            Architecture::Qwen2 => {
                s.tokenizer = TokenizerStyle::Qwen;
                s.tie_embeddings = true;
            }
            Architecture::Qwen3 => {
                s.tokenizer = TokenizerStyle::Qwen3;
                s.heads = 4;
                s.head_dim = 128;
                s.tie_embeddings = true;
            }
        }
        s
    }

    fn template(&self) -> &'static str {
        match self.tokenizer {
            TokenizerStyle::Llama3 => templates::LLAMA3,
            TokenizerStyle::Qwen => templates::CHATML,
            TokenizerStyle::Qwen3 => templates::QWEN3,
            TokenizerStyle::Llama2 => templates::LLAMA2,
            TokenizerStyle::Mistral => templates::MISTRAL,
        }
    }
}

/// The files a synthesised model was written to.
#[derive(Debug, Clone)]
pub struct SynthModel {
    /// The Hugging Face directory.
    pub dir: PathBuf,
    /// GGUF files by storage type.
    pub gguf: Vec<(FileType, PathBuf)>,
    /// The configuration.
    pub config: ModelConfig,
}

impl SynthModel {
    /// The GGUF file of a type, if it was written.
    pub fn gguf_path(&self, t: FileType) -> Option<&Path> {
        self.gguf
            .iter()
            .find(|(ft, _)| *ft == t)
            .map(|(_, p)| p.as_path())
    }
}

fn random(rng: &mut ChaCha8Rng, shape: &[usize], mean: f32, std: f32) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let dist = Normal::new(mean, std).map_err(|e| Error::Invalid(e.to_string()))?;
    let v: Vec<f32> = (0..n).map(|_| dist.sample(rng)).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// Random weights for `cfg`, in loading order, scaled so activations stay near unit size and the
/// output distribution is peaked enough for greedy decoding to be stable.
pub fn random_weights(cfg: &ModelConfig, seed: u64) -> Result<Vec<(WeightName, Tensor)>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (h, f, d) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
    let (q, kv) = (cfg.num_heads * d, cfg.num_kv_heads * d);
    let inv = |n: usize| 1.0 / (n as f32).sqrt();
    // Projections into the residual stream are scaled down by sqrt(2 * layers), as GPT-2 and
    // Megatron initialise them, so a perturbation does not grow layer after layer: quantization
    // error then stays proportionate, as in trained models.
    let residual = 1.0 / (2.0 * cfg.num_layers as f32).sqrt();
    let mut w = vec![(
        WeightName::Embed,
        random(&mut rng, &[cfg.vocab_size, h], 0.0, 1.0)?,
    )];
    for i in 0..cfg.num_layers {
        let l = |x| WeightName::Layer(i, x);
        w.push((l(LayerWeight::AttnNorm), random(&mut rng, &[h], 1.0, 0.1)?));
        w.push((l(LayerWeight::Q), random(&mut rng, &[q, h], 0.0, inv(h))?));
        w.push((l(LayerWeight::K), random(&mut rng, &[kv, h], 0.0, inv(h))?));
        w.push((l(LayerWeight::V), random(&mut rng, &[kv, h], 0.0, inv(h))?));
        if cfg.qkv_bias {
            w.push((l(LayerWeight::QBias), random(&mut rng, &[q], 0.0, 0.1)?));
            w.push((l(LayerWeight::KBias), random(&mut rng, &[kv], 0.0, 0.1)?));
            w.push((l(LayerWeight::VBias), random(&mut rng, &[kv], 0.0, 0.1)?));
        }
        if cfg.arch.has_qk_norm() {
            w.push((l(LayerWeight::QNorm), random(&mut rng, &[d], 1.0, 0.1)?));
            w.push((l(LayerWeight::KNorm), random(&mut rng, &[d], 1.0, 0.1)?));
        }
        w.push((
            l(LayerWeight::O),
            random(&mut rng, &[h, q], 0.0, inv(q) * residual)?,
        ));
        w.push((l(LayerWeight::MlpNorm), random(&mut rng, &[h], 1.0, 0.1)?));
        w.push((
            l(LayerWeight::Gate),
            random(&mut rng, &[f, h], 0.0, inv(h))?,
        ));
        w.push((l(LayerWeight::Up), random(&mut rng, &[f, h], 0.0, inv(h))?));
        w.push((
            l(LayerWeight::Down),
            random(&mut rng, &[h, f], 0.0, inv(f) * residual)?,
        ));
    }
    w.push((WeightName::FinalNorm, random(&mut rng, &[h], 1.0, 0.1)?));
    if !cfg.tie_word_embeddings {
        w.push((
            WeightName::LmHead,
            random(&mut rng, &[cfg.vocab_size, h], 0.0, 3.0 * inv(h))?,
        ));
    }
    Ok(w)
}

fn tensor_bytes(t: &Tensor, dtype: StDtype) -> Result<(safetensors::Dtype, Vec<u8>)> {
    let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
    Ok(match dtype {
        StDtype::F32 => (
            safetensors::Dtype::F32,
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ),
        StDtype::F16 => (
            safetensors::Dtype::F16,
            v.iter()
                .flat_map(|x| f16::from_f32(*x).to_le_bytes())
                .collect(),
        ),
        StDtype::BF16 => (
            safetensors::Dtype::BF16,
            v.iter()
                .flat_map(|x| bf16::from_f32(*x).to_le_bytes())
                .collect(),
        ),
    })
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::Invalid(e.to_string()))?;
    std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
}

/// Writes weights as safetensors in `dir`: one file, or `shards` files and an index.
pub fn write_safetensors(
    dir: &Path,
    weights: &[(WeightName, Tensor)],
    dtype: StDtype,
    shards: usize,
) -> Result<()> {
    let encoded: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = weights
        .iter()
        .map(|(n, t)| {
            let (dt, bytes) = tensor_bytes(t, dtype)?;
            Ok((n.hf(), dt, t.dims().to_vec(), bytes))
        })
        .collect::<Result<_>>()?;
    let total: usize = encoded.iter().map(|e| e.3.len()).sum();
    let shards = shards.max(1);
    let mut groups: Vec<Vec<usize>> = vec![Vec::new(); shards];
    let per = total.div_ceil(shards);
    let mut acc = 0;
    for (i, e) in encoded.iter().enumerate() {
        let g = (acc / per.max(1)).min(shards - 1);
        groups[g].push(i);
        acc += e.3.len();
    }
    groups.retain(|g| !g.is_empty());
    let n = groups.len();
    let mut weight_map = serde_json::Map::new();
    for (gi, group) in groups.iter().enumerate() {
        let file = if shards == 1 {
            SINGLE_FILE.to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", gi + 1, n)
        };
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = group
            .iter()
            .map(|&i| {
                let e = &encoded[i];
                weight_map.insert(e.0.clone(), json!(file));
                safetensors::tensor::TensorView::new(e.1, e.2.clone(), &e.3)
                    .map(|v| (e.0.clone(), v))
                    .map_err(|err| Error::Invalid(err.to_string()))
            })
            .collect::<Result<_>>()?;
        let path = dir.join(&file);
        let mut meta = std::collections::HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        safetensors::serialize_to_file(views, Some(meta), &path)
            .map_err(|e| Error::format(&path, e.to_string()))?;
    }
    if shards > 1 {
        write_json(
            &dir.join(INDEX_FILE),
            &json!({"metadata": {"total_size": total}, "weight_map": weight_map}),
        )?;
    }
    Ok(())
}

/// Makes the model described by `spec` in `out` (created if missing).
pub fn make_model(spec: &SynthSpec, out: &Path) -> Result<SynthModel> {
    let built = tokenizer::build(spec.tokenizer, spec.vocab)?;
    let config = ModelConfig {
        arch: spec.arch,
        vocab_size: built.vocab.tokens.len(),
        hidden_size: spec.hidden,
        intermediate_size: spec.intermediate,
        num_layers: spec.layers,
        num_heads: spec.heads,
        num_kv_heads: spec.kv_heads,
        head_dim: spec.head_dim,
        rms_norm_eps: 1e-5,
        rope: RopeConfig {
            theta: if spec.llama3_rope {
                500_000.0
            } else {
                10_000.0
            },
            scaling: spec.llama3_rope.then_some(RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 256.0,
            }),
        },
        max_position_embeddings: spec.context,
        tie_word_embeddings: spec.tie_embeddings,
        qkv_bias: spec.arch == Architecture::Qwen2,
        sliding_window: spec.sliding_window,
        eos_token_ids: built.eos_ids.clone(),
        bos_token_id: built.bos_id,
    };
    config.validate(out)?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut weights = random_weights(&config, spec.seed)?;
    // The checkpoint's precision is the truth: GGUF files are made from the same rounded values.
    let round = match spec.dtype {
        StDtype::F32 => None,
        StDtype::F16 => Some(candle_core::DType::F16),
        StDtype::BF16 => Some(candle_core::DType::BF16),
    };
    if let Some(dt) = round {
        for (_, t) in &mut weights {
            *t = t.to_dtype(dt)?.to_dtype(candle_core::DType::F32)?;
        }
    }
    let mut config_json = config.to_hf_json();
    config_json["torch_dtype"] = json!(match spec.dtype {
        StDtype::F32 => "float32",
        StDtype::F16 => "float16",
        StDtype::BF16 => "bfloat16",
    });
    write_json(&out.join("config.json"), &config_json)?;
    let mut gen_config = json!({"eos_token_id": built.eos_ids});
    if let Some(bos) = built.bos_id {
        gen_config["bos_token_id"] = json!(bos);
    }
    write_json(&out.join("generation_config.json"), &gen_config)?;
    write_json(&out.join("tokenizer.json"), &built.tokenizer_json)?;
    let mut tok_config = built.tokenizer_config.clone();
    tok_config["chat_template"] = json!(spec.template());
    write_json(&out.join("tokenizer_config.json"), &tok_config)?;
    write_safetensors(out, &weights, spec.dtype, spec.shards)?;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "synthetic".into());
    let export = GgufExport {
        config: &config,
        vocab: &built.vocab,
        chat_template: Some(spec.template()),
        name: &name,
        weights: &weights,
    };
    let mut gguf = Vec::new();
    for &t in &spec.gguf {
        let path = out.join(format!("model-{}.gguf", t.name()));
        export.write(&path, t)?;
        gguf.push((t, path));
    }
    Ok(SynthModel {
        dir: out.to_path_buf(),
        gguf,
        config,
    })
}

/// A fresh directory `root/<name>-<pid>` for this process's generated models, for test
/// binaries that share models through a static (which is never dropped, so a `TempDir` there
/// is never removed). Directories of earlier processes of the same `name` that have exited are
/// removed first, where `/proc` says which have (elsewhere they stay under `root`).
pub fn process_dir(root: &Path, name: &str) -> std::io::Result<PathBuf> {
    let proc_fs = Path::new("/proc/self").exists();
    let prefix = format!("{name}-");
    for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let file = entry.file_name();
        let Some(pid) = file.to_str().and_then(|f| f.strip_prefix(&prefix)) else {
            continue;
        };
        if proc_fs && pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let dir = root.join(format!("{prefix}{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
