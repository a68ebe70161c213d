//! Where a model's weights come from. The model code asks for weights by role
//! ([`WeightName`]); each file format maps roles to its own tensor names, checks shapes, and
//! hands back tensors in memory. Only the tensors asked for are read, so a shard of a few layers
//! touches only those layers' bytes.

use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Tensor};
use half::{bf16, f16};
use llmesh_kernels::{QMatrix, QType};

use crate::error::Result;

/// The role of a tensor in one transformer block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayerWeight {
    /// RMSNorm before attention.
    AttnNorm,
    /// Query projection.
    Q,
    /// Key projection.
    K,
    /// Value projection.
    V,
    /// Attention output projection.
    O,
    /// Query bias.
    QBias,
    /// Key bias.
    KBias,
    /// Value bias.
    VBias,
    /// Per-head RMSNorm of queries (Qwen3).
    QNorm,
    /// Per-head RMSNorm of keys (Qwen3).
    KNorm,
    /// RMSNorm before the MLP.
    MlpNorm,
    /// MLP gate projection.
    Gate,
    /// MLP up projection.
    Up,
    /// MLP down projection.
    Down,
}

impl LayerWeight {
    /// All roles, in the order the model loads them.
    pub const ALL: [LayerWeight; 14] = [
        LayerWeight::AttnNorm,
        LayerWeight::Q,
        LayerWeight::K,
        LayerWeight::V,
        LayerWeight::O,
        LayerWeight::QBias,
        LayerWeight::KBias,
        LayerWeight::VBias,
        LayerWeight::QNorm,
        LayerWeight::KNorm,
        LayerWeight::MlpNorm,
        LayerWeight::Gate,
        LayerWeight::Up,
        LayerWeight::Down,
    ];
}

/// The role of a tensor in the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightName {
    /// Token embedding matrix.
    Embed,
    /// Final RMSNorm.
    FinalNorm,
    /// Output head (absent when tied to the embedding).
    LmHead,
    /// A tensor of block `i`.
    Layer(usize, LayerWeight),
}

impl WeightName {
    /// The tensor's name in a Hugging Face checkpoint.
    pub fn hf(self) -> String {
        match self {
            WeightName::Embed => "model.embed_tokens.weight".into(),
            WeightName::FinalNorm => "model.norm.weight".into(),
            WeightName::LmHead => "lm_head.weight".into(),
            WeightName::Layer(i, w) => {
                let suffix = match w {
                    LayerWeight::AttnNorm => "input_layernorm.weight",
                    LayerWeight::Q => "self_attn.q_proj.weight",
                    LayerWeight::K => "self_attn.k_proj.weight",
                    LayerWeight::V => "self_attn.v_proj.weight",
                    LayerWeight::O => "self_attn.o_proj.weight",
                    LayerWeight::QBias => "self_attn.q_proj.bias",
                    LayerWeight::KBias => "self_attn.k_proj.bias",
                    LayerWeight::VBias => "self_attn.v_proj.bias",
                    LayerWeight::QNorm => "self_attn.q_norm.weight",
                    LayerWeight::KNorm => "self_attn.k_norm.weight",
                    LayerWeight::MlpNorm => "post_attention_layernorm.weight",
                    LayerWeight::Gate => "mlp.gate_proj.weight",
                    LayerWeight::Up => "mlp.up_proj.weight",
                    LayerWeight::Down => "mlp.down_proj.weight",
                };
                format!("model.layers.{i}.{suffix}")
            }
        }
    }

    /// The tensor's name in a GGUF file (llama.cpp's naming).
    pub fn gguf(self) -> String {
        match self {
            WeightName::Embed => "token_embd.weight".into(),
            WeightName::FinalNorm => "output_norm.weight".into(),
            WeightName::LmHead => "output.weight".into(),
            WeightName::Layer(i, w) => {
                let suffix = match w {
                    LayerWeight::AttnNorm => "attn_norm.weight",
                    LayerWeight::Q => "attn_q.weight",
                    LayerWeight::K => "attn_k.weight",
                    LayerWeight::V => "attn_v.weight",
                    LayerWeight::O => "attn_output.weight",
                    LayerWeight::QBias => "attn_q.bias",
                    LayerWeight::KBias => "attn_k.bias",
                    LayerWeight::VBias => "attn_v.bias",
                    LayerWeight::QNorm => "attn_q_norm.weight",
                    LayerWeight::KNorm => "attn_k_norm.weight",
                    LayerWeight::MlpNorm => "ffn_norm.weight",
                    LayerWeight::Gate => "ffn_gate.weight",
                    LayerWeight::Up => "ffn_up.weight",
                    LayerWeight::Down => "ffn_down.weight",
                };
                format!("blk.{i}.{suffix}")
            }
        }
    }
}

/// A weight matrix as held in memory: dense f32, or in its stored (quantized or half) type,
/// multiplied without widening.
#[derive(Debug, Clone)]
pub enum Weight {
    /// A dense f32 matrix `[out, in]`.
    Dense(Tensor),
    /// A matrix `[out, in]` kept in a ggml storage type that llmesh's own kernels multiply
    /// (f16, bf16, Q8_0, Q4_0, Q4_K, Q6_K).
    Packed(Arc<QMatrix>),
    /// A matrix `[out, in]` kept in another ggml storage type, multiplied by candle.
    Quantized(Arc<QTensor>),
}

impl Weight {
    /// `[rows, cols]` of the matrix.
    pub fn dims(&self) -> Vec<usize> {
        match self {
            Weight::Dense(t) => t.dims().to_vec(),
            Weight::Packed(m) => vec![m.rows(), m.cols()],
            Weight::Quantized(q) => q.shape().dims().to_vec(),
        }
    }

    /// Bytes held in memory.
    pub fn size_in_bytes(&self) -> usize {
        match self {
            Weight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Weight::Packed(m) => m.size_in_bytes(),
            Weight::Quantized(q) => q.storage_size_in_bytes(),
        }
    }

    /// The matrix widened to f32 (for tests and export).
    pub fn to_f32(&self) -> Result<Tensor> {
        Ok(match self {
            Weight::Dense(t) => t.clone(),
            Weight::Packed(m) => {
                Tensor::from_vec(m.dequantize(), (m.rows(), m.cols()), &Device::Cpu)?
            }
            Weight::Quantized(q) => q.dequantize(&Device::Cpu)?,
        })
    }
}

/// A source of weights: one model's files in one format.
pub trait WeightSource {
    /// The file or directory, for error messages.
    fn path(&self) -> &Path;

    /// Whether the files hold this tensor.
    fn contains(&self, name: WeightName) -> bool;

    /// Reads a `[rows, cols]` matrix, keeping quantized and half-precision types as stored.
    fn matrix(&self, name: WeightName, rows: usize, cols: usize) -> Result<Weight>;

    /// Reads a vector of `len` values as f32.
    fn vector(&self, name: WeightName, len: usize) -> Result<Tensor>;
}

/// Decodes little-endian floats of a storage type into f32.
pub(crate) fn floats_to_f32(bytes: &[u8], dtype: GgmlDType) -> Option<Vec<f32>> {
    Some(match dtype {
        GgmlDType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        GgmlDType::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        GgmlDType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}

/// Builds an in-memory weight from stored bytes: f32 becomes a dense tensor, anything else stays
/// in its storage type.
pub(crate) fn weight_from_bytes(
    bytes: TensorBytes<'_>,
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
) -> Result<Weight> {
    if let Some(ty) = kernel_type(dtype) {
        let m = QMatrix::new(ty, rows, cols, bytes.into_vec())
            .map_err(|e| crate::error::Error::Invalid(e.to_string()))?;
        return Ok(Weight::Packed(Arc::new(m)));
    }
    let bytes = bytes.as_slice();
    if dtype == GgmlDType::F32 {
        let v = floats_to_f32(bytes, dtype).unwrap_or_default();
        return Ok(Weight::Dense(Tensor::from_vec(
            v,
            (rows, cols),
            &Device::Cpu,
        )?));
    }
    // candle reinterprets the bytes as blocks, which needs them aligned; copy when they are not.
    let aligned: Cow<'_, [u8]> = if (bytes.as_ptr() as usize).is_multiple_of(16) {
        Cow::Borrowed(bytes)
    } else {
        Cow::Owned(aligned_copy(bytes))
    };
    let storage = QStorage::from_data(aligned, &Device::Cpu, dtype)?;
    Ok(Weight::Quantized(Arc::new(QTensor::new(
        storage,
        (rows, cols),
    )?)))
}

/// The kernel type of a ggml storage type, where llmesh has its own kernel.
pub(crate) fn kernel_type(dtype: GgmlDType) -> Option<QType> {
    Some(match dtype {
        GgmlDType::F16 => QType::F16,
        GgmlDType::BF16 => QType::BF16,
        GgmlDType::Q8_0 => QType::Q8_0,
        GgmlDType::Q4_0 => QType::Q4_0,
        GgmlDType::Q4K => QType::Q4K,
        GgmlDType::Q6K => QType::Q6K,
        _ => return None,
    })
}

fn aligned_copy(bytes: &[u8]) -> Vec<u8> {
    // A Vec<u8> from the global allocator is aligned to at least 16 bytes on the platforms we run.
    let mut v = Vec::with_capacity(bytes.len().max(16));
    v.extend_from_slice(bytes);
    v
}

/// Reorders the rows of a row-major matrix stored as `row_bytes`-byte rows: row `i` of the result
/// is row `src_row(i)` of `bytes`. Works for any storage type because each row is whole blocks.
pub(crate) fn permute_rows(
    bytes: &[u8],
    row_bytes: usize,
    src_row: impl Fn(usize) -> usize,
) -> Vec<u8> {
    let rows = bytes.len() / row_bytes;
    let mut out = crate::system::huge_page_buffer(bytes.len());
    for i in 0..rows {
        let s = src_row(i) * row_bytes;
        out.extend_from_slice(&bytes[s..s + row_bytes]);
    }
    out
}

/// For llama.cpp's q/k row permutation (`convert_hf_to_gguf.py` `permute`): the GGUF row holding
/// Hugging Face row `hf_row`, for heads of `head_dim` rows.
pub(crate) fn gguf_row_of_hf_row(hf_row: usize, head_dim: usize) -> usize {
    let half = head_dim / 2;
    let head = hf_row / head_dim;
    let r = hf_row % head_dim;
    let (i, j) = (r / half, r % half);
    head * head_dim + 2 * j + i
}

/// The inverse of [`gguf_row_of_hf_row`].
pub(crate) fn hf_row_of_gguf_row(gguf_row: usize, head_dim: usize) -> usize {
    let half = head_dim / 2;
    let head = gguf_row / head_dim;
    let r = gguf_row % head_dim;
    let (j, i) = (r / 2, r % 2);
    head * head_dim + i * half + j
}

/// A tensor's bytes: still in a file mapping, or already copied out (e.g. reordered).
pub(crate) enum TensorBytes<'a> {
    /// A range of a read-only file mapping.
    Mapped(&'a memmap2::Mmap, &'a [u8]),
    /// Bytes of our own.
    Owned(Vec<u8>),
}

impl TensorBytes<'_> {
    fn as_slice(&self) -> &[u8] {
        match self {
            TensorBytes::Mapped(_, b) => b,
            TensorBytes::Owned(v) => v,
        }
    }

    /// The bytes in a vector of our own. Mapped bytes are copied a few MiB at a time, dropping
    /// each piece's mapped pages once copied, so a large tensor (a 32,000-token embedding in F16
    /// is 131 MB) is never resident twice.
    fn into_vec(self) -> Vec<u8> {
        const PIECE: usize = 8 << 20;
        match self {
            TensorBytes::Owned(v) => v,
            TensorBytes::Mapped(map, bytes) => {
                let base = map.as_ptr() as usize;
                let mut v = crate::system::huge_page_buffer(bytes.len());
                for piece in bytes.chunks(PIECE) {
                    v.extend_from_slice(piece);
                    release_mapped(map, piece.as_ptr() as usize - base, piece.len());
                }
                v
            }
        }
    }
}

/// Tells the kernel it may drop the pages of `range` of a read-only file mapping from this
/// process (they are re-read from the page cache if touched again). Keeps peak resident memory
/// at the copied weights rather than copies plus mapped file pages.
pub(crate) fn release_mapped(map: &memmap2::Mmap, start: usize, len: usize) {
    const PAGE: usize = 4096;
    let begin = start / PAGE * PAGE;
    let end = (start + len)
        .div_ceil(PAGE)
        .saturating_mul(PAGE)
        .min(map.len());
    if end > begin {
        // SAFETY: the mapping is read-only and file-backed, so dropping its pages loses nothing:
        // a later read faults them back in from the file. No references into the range are used
        // after this call other than through the map, which stays valid.
        let _ = unsafe {
            map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, begin, end - begin)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qk_permutation_is_a_bijection_and_inverse() {
        for head_dim in [2, 4, 8, 64] {
            let n = head_dim * 3;
            let mut seen = vec![false; n];
            for r in 0..n {
                let g = gguf_row_of_hf_row(r, head_dim);
                assert!(!seen[g]);
                seen[g] = true;
                assert_eq!(hf_row_of_gguf_row(g, head_dim), r);
            }
        }
        // The rotate-half pair (j, j + half) becomes the adjacent pair (2j, 2j + 1).
        assert_eq!(gguf_row_of_hf_row(0, 8), 0);
        assert_eq!(gguf_row_of_hf_row(4, 8), 1);
        assert_eq!(gguf_row_of_hf_row(1, 8), 2);
    }

    #[test]
    fn names_follow_both_conventions() {
        let n = WeightName::Layer(3, LayerWeight::MlpNorm);
        assert_eq!(n.hf(), "model.layers.3.post_attention_layernorm.weight");
        assert_eq!(n.gguf(), "blk.3.ffn_norm.weight");
    }
}
