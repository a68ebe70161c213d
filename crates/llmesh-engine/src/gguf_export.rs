//! Writing a model as a GGUF file that llama.cpp (and llmesh) reads: metadata in llama.cpp's
//! keys, tensors in its names, q/k rows in its permuted layout for `llama`, and quantization in
//! the usual file types, including the mixed `Q4_K_M` and `Q5_K_M`.

use std::borrow::Cow;
use std::path::Path;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use half::{bf16, f16};

use crate::config::{ModelConfig, RopeScaling};
use crate::error::{Error, Result};
use crate::gguf::{self, MetaValue, TensorToWrite};
use crate::tokenizer::GgufVocab;
use crate::weights::{LayerWeight, WeightName, hf_row_of_gguf_row, permute_rows};

/// The storage type of a GGUF file, as `llama-quantize` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileType {
    /// All 32-bit floats.
    F32,
    /// 16-bit floats.
    F16,
    /// bfloat16.
    BF16,
    /// 8-bit blocks.
    Q8_0,
    /// 4-bit blocks.
    Q4_0,
    /// 4-bit blocks with offsets.
    Q4_1,
    /// 5-bit blocks.
    Q5_0,
    /// 5-bit blocks with offsets.
    Q5_1,
    /// 2-bit k-quants.
    Q2K,
    /// 3-bit k-quants.
    Q3K,
    /// 4-bit k-quants.
    Q4K,
    /// 5-bit k-quants.
    Q5K,
    /// 6-bit k-quants.
    Q6K,
    /// 4-bit k-quants with 6-bit attention values and MLP down projections in some layers.
    Q4KM,
    /// 5-bit k-quants with 6-bit attention values and MLP down projections in some layers.
    Q5KM,
}

impl FileType {
    /// Every file type.
    pub const ALL: [FileType; 15] = [
        FileType::F32,
        FileType::F16,
        FileType::BF16,
        FileType::Q8_0,
        FileType::Q4_0,
        FileType::Q4_1,
        FileType::Q5_0,
        FileType::Q5_1,
        FileType::Q2K,
        FileType::Q3K,
        FileType::Q4K,
        FileType::Q5K,
        FileType::Q6K,
        FileType::Q4KM,
        FileType::Q5KM,
    ];

    /// The lower-case name (`q4_k_m`).
    pub fn name(self) -> &'static str {
        match self {
            FileType::F32 => "f32",
            FileType::F16 => "f16",
            FileType::BF16 => "bf16",
            FileType::Q8_0 => "q8_0",
            FileType::Q4_0 => "q4_0",
            FileType::Q4_1 => "q4_1",
            FileType::Q5_0 => "q5_0",
            FileType::Q5_1 => "q5_1",
            FileType::Q2K => "q2_k",
            FileType::Q3K => "q3_k",
            FileType::Q4K => "q4_k",
            FileType::Q5K => "q5_k",
            FileType::Q6K => "q6_k",
            FileType::Q4KM => "q4_k_m",
            FileType::Q5KM => "q5_k_m",
        }
    }

    /// Parses a name (case-insensitive).
    pub fn from_name(s: &str) -> Option<Self> {
        let s = s.to_ascii_lowercase();
        Self::ALL.into_iter().find(|t| t.name() == s)
    }

    /// llama.cpp's `general.file_type` value.
    fn id(self) -> u32 {
        match self {
            FileType::F32 => 0,
            FileType::F16 => 1,
            FileType::Q4_0 => 2,
            FileType::Q4_1 => 3,
            FileType::Q8_0 => 7,
            FileType::Q5_0 => 8,
            FileType::Q5_1 => 9,
            FileType::Q2K => 10,
            FileType::Q3K => 11,
            FileType::Q4K => 14,
            FileType::Q4KM => 15,
            FileType::Q5K => 16,
            FileType::Q5KM => 17,
            FileType::Q6K => 18,
            FileType::BF16 => 32,
        }
    }

    fn base(self) -> GgmlDType {
        match self {
            FileType::F32 => GgmlDType::F32,
            FileType::F16 => GgmlDType::F16,
            FileType::BF16 => GgmlDType::BF16,
            FileType::Q8_0 => GgmlDType::Q8_0,
            FileType::Q4_0 => GgmlDType::Q4_0,
            FileType::Q4_1 => GgmlDType::Q4_1,
            FileType::Q5_0 => GgmlDType::Q5_0,
            FileType::Q5_1 => GgmlDType::Q5_1,
            FileType::Q2K => GgmlDType::Q2K,
            FileType::Q3K => GgmlDType::Q3K,
            FileType::Q4K | FileType::Q4KM => GgmlDType::Q4K,
            FileType::Q5K | FileType::Q5KM => GgmlDType::Q5K,
            FileType::Q6K => GgmlDType::Q6K,
        }
    }

    fn is_quantized(self) -> bool {
        !matches!(self, FileType::F32 | FileType::F16 | FileType::BF16)
    }

    /// The storage type of a matrix with rows of `cols` values, following llama.cpp's choices.
    pub fn tensor_type(self, name: WeightName, num_layers: usize, cols: usize) -> GgmlDType {
        // llama.cpp's `use_more_bits`: the first and last eighth of the layers, and every third
        // layer between.
        let eighth = num_layers / 8;
        let more_bits = |i: usize| match i.checked_sub(eighth) {
            None => true,
            Some(k) => i >= 7 * num_layers / 8 || k % 3 == 2,
        };
        let wanted = match (self, name) {
            (FileType::Q8_0, _) => GgmlDType::Q8_0,
            (t, WeightName::LmHead) if t.is_quantized() => GgmlDType::Q6K,
            (
                FileType::Q4KM | FileType::Q5KM,
                WeightName::Layer(i, LayerWeight::V | LayerWeight::Down),
            ) if more_bits(i) => GgmlDType::Q6K,
            (t, _) => t.base(),
        };
        fallback(wanted, cols)
    }
}

/// llama.cpp's substitutes for k-quants when a row is not whole 256-value blocks.
fn fallback(t: GgmlDType, cols: usize) -> GgmlDType {
    if cols.is_multiple_of(t.block_size()) {
        return t;
    }
    let alt = match t {
        GgmlDType::Q2K | GgmlDType::Q3K => GgmlDType::Q4_0,
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        _ => GgmlDType::F16,
    };
    if cols.is_multiple_of(alt.block_size()) {
        alt
    } else {
        GgmlDType::F16
    }
}

impl std::fmt::Display for FileType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn encode(t: &Tensor, dtype: GgmlDType) -> Result<Vec<u8>> {
    let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
    Ok(match dtype {
        GgmlDType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        GgmlDType::F16 => v
            .iter()
            .flat_map(|x| f16::from_f32(*x).to_le_bytes())
            .collect(),
        GgmlDType::BF16 => v
            .iter()
            .flat_map(|x| bf16::from_f32(*x).to_le_bytes())
            .collect(),
        q => QTensor::quantize(t, q)?.data()?.into_owned(),
    })
}

/// What to write: the model's description, vocabulary and f32 weights by role.
pub struct GgufExport<'a> {
    /// The model's configuration.
    pub config: &'a ModelConfig,
    /// Its vocabulary.
    pub vocab: &'a GgufVocab,
    /// Its chat template, if any.
    pub chat_template: Option<&'a str>,
    /// `general.name`.
    pub name: &'a str,
    /// Every weight, f32, in Hugging Face layout (`[out, in]` matrices, q/k unpermuted).
    pub weights: &'a [(WeightName, Tensor)],
}

impl GgufExport<'_> {
    /// Writes the file.
    pub fn write(&self, path: &Path, file_type: FileType) -> Result<()> {
        let cfg = self.config;
        let arch = cfg.arch.gguf_name();
        let mut meta: Vec<(String, MetaValue)> = Vec::new();
        let mut put = |k: &str, v: MetaValue| meta.push((k.to_string(), v));
        put("general.architecture", MetaValue::String(arch.into()));
        put("general.name", MetaValue::String(self.name.into()));
        put("general.file_type", MetaValue::U32(file_type.id()));
        put("general.quantization_version", MetaValue::U32(2));
        let a = |k: &str| format!("{arch}.{k}");
        put(&a("vocab_size"), MetaValue::U32(cfg.vocab_size as u32));
        put(
            &a("context_length"),
            MetaValue::U32(cfg.max_position_embeddings as u32),
        );
        put(
            &a("embedding_length"),
            MetaValue::U32(cfg.hidden_size as u32),
        );
        put(
            &a("feed_forward_length"),
            MetaValue::U32(cfg.intermediate_size as u32),
        );
        put(&a("block_count"), MetaValue::U32(cfg.num_layers as u32));
        put(
            &a("attention.head_count"),
            MetaValue::U32(cfg.num_heads as u32),
        );
        put(
            &a("attention.head_count_kv"),
            MetaValue::U32(cfg.num_kv_heads as u32),
        );
        put(
            &a("attention.layer_norm_rms_epsilon"),
            MetaValue::F32(cfg.rms_norm_eps as f32),
        );
        put(&a("rope.freq_base"), MetaValue::F32(cfg.rope.theta as f32));
        put(
            &a("rope.dimension_count"),
            MetaValue::U32(cfg.head_dim as u32),
        );
        if cfg.head_dim * cfg.num_heads != cfg.hidden_size || cfg.arch.has_qk_norm() {
            put(
                &a("attention.key_length"),
                MetaValue::U32(cfg.head_dim as u32),
            );
            put(
                &a("attention.value_length"),
                MetaValue::U32(cfg.head_dim as u32),
            );
        }
        if let Some(RopeScaling::Linear { factor }) = cfg.rope.scaling {
            put(&a("rope.scaling.type"), MetaValue::String("linear".into()));
            put(&a("rope.scaling.factor"), MetaValue::F32(factor as f32));
        }
        if let Some(w) = cfg.sliding_window {
            put(&a("attention.sliding_window"), MetaValue::U32(w as u32));
        }
        meta.extend(self.vocab.to_metadata());
        if let Some(t) = self.chat_template {
            meta.push((
                "tokenizer.chat_template".into(),
                MetaValue::String(t.into()),
            ));
        }

        let mut tensors = Vec::with_capacity(self.weights.len() + 1);
        if let Some(factors) = cfg.rope.freq_factors(cfg.head_dim) {
            let t = Tensor::new(factors, &Device::Cpu)?;
            tensors.push(TensorToWrite {
                name: "rope_freqs.weight".into(),
                dtype: GgmlDType::F32,
                dims: vec![cfg.head_dim / 2],
                data: Cow::Owned(encode(&t, GgmlDType::F32)?),
            });
        }
        for (name, tensor) in self.weights {
            let tensor = tensor.to_dtype(candle_core::DType::F32)?;
            let dims = tensor.dims().to_vec();
            let tensor = match name {
                WeightName::Layer(
                    _,
                    LayerWeight::Q | LayerWeight::K | LayerWeight::QBias | LayerWeight::KBias,
                ) if cfg.arch.gguf_permutes_qk() => {
                    let row_len: usize = dims[1..].iter().product();
                    let bytes = encode(&tensor, GgmlDType::F32)?;
                    let permuted =
                        permute_rows(&bytes, row_len * 4, |g| hf_row_of_gguf_row(g, cfg.head_dim));
                    let floats: Vec<f32> = permuted
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect();
                    Tensor::from_vec(floats, dims.as_slice(), &Device::Cpu)?
                }
                _ => tensor,
            };
            let dtype = if dims.len() == 1 {
                GgmlDType::F32
            } else {
                file_type.tensor_type(*name, cfg.num_layers, dims[dims.len() - 1])
            };
            tensors.push(TensorToWrite {
                name: name.gguf(),
                dtype,
                dims,
                data: Cow::Owned(encode(&tensor, dtype)?),
            });
        }
        gguf::write(path, &meta, &tensors).map_err(|e| match e {
            Error::Io { .. } => e,
            other => Error::format(path, other.to_string()),
        })
    }
}
