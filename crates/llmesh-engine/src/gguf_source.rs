//! Weights and configuration from a GGUF file. Quantized tensors stay quantized in memory; the
//! configuration comes from the file's metadata.
//!
//! llama.cpp's converter permutes the rows of q and k of `llama`-architecture models into the
//! interleaved rotary layout. We undo that permutation while loading (rows are whole blocks, so it
//! is a byte shuffle for every storage type), which lets one model implementation run both
//! Hugging Face and GGUF files.

use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};

use crate::config::{Architecture, ModelConfig, RopeConfig, RopeScaling};
use crate::error::{Error, Result};
use crate::gguf::{self, Header, MetaValue};
use crate::weights::{
    LayerWeight, TensorBytes, Weight, WeightName, WeightSource, floats_to_f32, gguf_row_of_hf_row,
    permute_rows, release_mapped, weight_from_bytes,
};

/// An open GGUF file.
pub struct GgufSource {
    path: PathBuf,
    map: memmap2::Mmap,
    header: Header,
    /// Whether q and k rows are stored permuted, and the head size to undo it with.
    qk_permuted: Option<usize>,
}

impl GgufSource {
    /// Opens and parses `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only mapping of a model file that llmesh does not modify while loaded.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let header = gguf::read_header(&map, path)?;
        Ok(GgufSource {
            path: path.to_path_buf(),
            map,
            header,
            qk_permuted: None,
        })
    }

    /// The parsed header (metadata and tensor directory).
    pub fn header(&self) -> &Header {
        &self.header
    }

    fn meta(&self, key: &str) -> Option<&MetaValue> {
        self.header.get(key)
    }

    fn meta_usize(&self, key: &str) -> Result<usize> {
        self.meta(key)
            .and_then(MetaValue::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| {
                Error::config(
                    &self.path,
                    format!("missing or invalid GGUF metadata `{key}`"),
                )
            })
    }

    /// Reads the model configuration from the metadata, and remembers how q and k are stored.
    pub fn config(&mut self) -> Result<ModelConfig> {
        let arch_name = self
            .meta("general.architecture")
            .and_then(MetaValue::as_str)
            .ok_or_else(|| {
                Error::config(&self.path, "missing GGUF metadata `general.architecture`")
            })?
            .to_string();
        let arch = match arch_name.as_str() {
            "llama" => Architecture::Llama,
            "mistral" => Architecture::Mistral,
            "qwen2" => Architecture::Qwen2,
            "qwen3" => Architecture::Qwen3,
            _ => {
                return Err(Error::UnknownArchitecture {
                    path: self.path.clone(),
                    arch: arch_name,
                });
            }
        };
        let a = &arch_name;
        let hidden_size = self.meta_usize(&format!("{a}.embedding_length"))?;
        let num_heads = self.meta_usize(&format!("{a}.attention.head_count"))?;
        let num_kv_heads = self
            .meta_usize(&format!("{a}.attention.head_count_kv"))
            .unwrap_or(num_heads);
        let head_dim = match self.meta_usize(&format!("{a}.attention.key_length")) {
            Ok(d) => d,
            Err(_) if num_heads > 0 => hidden_size / num_heads,
            Err(e) => return Err(e),
        };
        let embed = self
            .header
            .tensors
            .get(&WeightName::Embed.gguf())
            .ok_or_else(|| Error::MissingTensor {
                path: self.path.clone(),
                name: WeightName::Embed.gguf(),
            })?;
        let vocab_size = embed.dims[0];
        let f = |key: &str| self.meta(key).and_then(MetaValue::as_f64);
        let scaling = if let Some(info) = self.header.tensors.get("rope_freqs.weight") {
            let bytes = &self.map[info.offset..info.offset + info.size];
            let factors = floats_to_f32(bytes, info.dtype).ok_or_else(|| {
                Error::format(
                    &self.path,
                    "tensor `rope_freqs.weight` must be F32, F16 or BF16",
                )
            })?;
            Some(RopeScaling::Factors(factors))
        } else {
            match self
                .meta(&format!("{a}.rope.scaling.type"))
                .and_then(MetaValue::as_str)
            {
                None | Some("none") => None,
                Some("linear") => Some(RopeScaling::Linear {
                    factor: f(&format!("{a}.rope.scaling.factor")).unwrap_or(1.0),
                }),
                Some(other) => {
                    return Err(Error::config(
                        &self.path,
                        format!(
                            "rope scaling `{other}` is not supported (supported: linear, llama3)"
                        ),
                    ));
                }
            }
        };
        let token_id = |key: &str| self.meta(key).and_then(MetaValue::as_u64).map(|v| v as u32);
        let mut eos_token_ids: Vec<u32> = [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ]
        .iter()
        .filter_map(|k| token_id(k))
        .collect();
        eos_token_ids.dedup();
        let config = ModelConfig {
            arch,
            vocab_size,
            hidden_size,
            intermediate_size: self.meta_usize(&format!("{a}.feed_forward_length"))?,
            num_layers: self.meta_usize(&format!("{a}.block_count"))?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: f(&format!("{a}.attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
            rope: RopeConfig {
                theta: f(&format!("{a}.rope.freq_base")).unwrap_or(10_000.0),
                scaling,
            },
            max_position_embeddings: self
                .meta_usize(&format!("{a}.context_length"))
                .unwrap_or(4096),
            tie_word_embeddings: !self.header.tensors.contains_key(&WeightName::LmHead.gguf()),
            qkv_bias: self
                .header
                .tensors
                .contains_key(&WeightName::Layer(0, LayerWeight::QBias).gguf()),
            sliding_window: self
                .meta(&format!("{a}.attention.sliding_window"))
                .and_then(MetaValue::as_u64)
                .map(|v| v as usize),
            eos_token_ids,
            bos_token_id: token_id("tokenizer.ggml.bos_token_id"),
        };
        config.validate(&self.path)?;
        self.qk_permuted = arch.gguf_permutes_qk().then_some(head_dim);
        Ok(config)
    }

    fn tensor(&self, name: WeightName, expected: &[usize]) -> Result<(&[u8], GgmlDType, String)> {
        let key = name.gguf();
        let info = self
            .header
            .tensors
            .get(&key)
            .ok_or_else(|| Error::MissingTensor {
                path: self.path.clone(),
                name: key.clone(),
            })?;
        if info.dims != expected {
            return Err(Error::Shape {
                path: self.path.clone(),
                name: key,
                got: info.dims.clone(),
                expected: expected.to_vec(),
            });
        }
        Ok((
            &self.map[info.offset..info.offset + info.size],
            info.dtype,
            key,
        ))
    }

    fn permuted_head_dim(&self, name: WeightName) -> Option<usize> {
        match name {
            WeightName::Layer(
                _,
                LayerWeight::Q | LayerWeight::K | LayerWeight::QBias | LayerWeight::KBias,
            ) => self.qk_permuted,
            _ => None,
        }
    }

    fn release(&self, bytes: &[u8]) {
        let start = bytes.as_ptr() as usize - self.map.as_ptr() as usize;
        release_mapped(&self.map, start, bytes.len());
    }
}

impl WeightSource for GgufSource {
    fn path(&self) -> &Path {
        &self.path
    }

    fn contains(&self, name: WeightName) -> bool {
        self.header.tensors.contains_key(&name.gguf())
    }

    fn matrix(&self, name: WeightName, rows: usize, cols: usize) -> Result<Weight> {
        let (bytes, dtype, _) = self.tensor(name, &[rows, cols])?;
        let weight = match self.permuted_head_dim(name) {
            Some(head_dim) if rows.is_multiple_of(head_dim) => {
                let unpermuted = permute_rows(bytes, bytes.len() / rows, |r| {
                    gguf_row_of_hf_row(r, head_dim)
                });
                weight_from_bytes(TensorBytes::Owned(unpermuted), dtype, rows, cols)?
            }
            _ => weight_from_bytes(TensorBytes::Mapped(&self.map, bytes), dtype, rows, cols)?,
        };
        self.release(bytes);
        Ok(weight)
    }

    fn vector(&self, name: WeightName, len: usize) -> Result<Tensor> {
        let (bytes, dtype, key) = self.tensor(name, &[len])?;
        let mut v = floats_to_f32(bytes, dtype).ok_or_else(|| {
            Error::format(
                &self.path,
                format!("tensor `{key}` is {dtype:?}; vectors must be F32, F16 or BF16"),
            )
        })?;
        if let Some(head_dim) = self.permuted_head_dim(name)
            && len.is_multiple_of(head_dim)
        {
            let src = v.clone();
            for (r, x) in v.iter_mut().enumerate() {
                *x = src[gguf_row_of_hf_row(r, head_dim)];
            }
        }
        self.release(bytes);
        Ok(Tensor::from_vec(v, len, &Device::Cpu)?)
    }
}
