//! One implementation of the decoder-only transformer family (Llama, Mistral, Qwen2, Qwen3) that
//! runs any contiguous range of layers: a [`Shard`]. The first shard embeds tokens, the last
//! applies the final norm and output head; the ones between pass activations.

use std::sync::Arc;

use candle_core::quantized::QMatMul;
use candle_core::{D, DType, Device, Module, Storage, Tensor};
use llmesh_kernels::{AttnShape, Backend, QMatrix, attend_causal, silu_mul};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::kv_cache::{KvCache, KvType};
use crate::weights::{LayerWeight, Weight, WeightName, WeightSource};

/// A half-open range of layer indices `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LayerRange {
    /// First layer.
    pub start: usize,
    /// One past the last layer.
    pub end: usize,
}

impl LayerRange {
    /// A range, checked against a model of `layers` layers.
    pub fn new(start: usize, end: usize, layers: usize) -> Result<Self> {
        if start >= end || end > layers {
            return Err(Error::LayerRange { start, end, layers });
        }
        Ok(LayerRange { start, end })
    }

    /// All layers of a model.
    pub fn full(layers: usize) -> Self {
        LayerRange {
            start: 0,
            end: layers,
        }
    }

    /// Number of layers.
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// Whether the range is empty (never true for a checked range).
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }
}

impl std::fmt::Display for LayerRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}..{}", self.start, self.end)
    }
}

/// What a shard consumes.
#[derive(Debug)]
pub enum ShardInput<'a> {
    /// Token ids (for the first shard).
    Tokens(&'a [u32]),
    /// Hidden states `[1, t, hidden]` from the previous shard.
    Hidden(Tensor),
}

/// Which positions' logits the last shard computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// Only the last position (generation).
    Last,
    /// Every position (prompt log-probabilities, tests).
    All,
}

/// What a shard produces.
#[derive(Debug)]
pub enum ShardOutput {
    /// Hidden states `[1, t, hidden]` for the next shard.
    Hidden(Tensor),
    /// Logits `[positions, vocab]`, f32.
    Logits(Tensor),
}

impl ShardOutput {
    /// The logits, or an error if this shard is not the last.
    pub fn into_logits(self) -> Result<Tensor> {
        match self {
            ShardOutput::Logits(l) => Ok(l),
            ShardOutput::Hidden(_) => Err(Error::Invalid(
                "this shard does not hold the output head".into(),
            )),
        }
    }

    /// The hidden states, or an error if this shard is the last.
    pub fn into_hidden(self) -> Result<Tensor> {
        match self {
            ShardOutput::Hidden(h) => Ok(h),
            ShardOutput::Logits(_) => Err(Error::Invalid(
                "this shard produced logits, not hidden states".into(),
            )),
        }
    }
}

/// A linear layer `y = x Wᵀ + b` over a dense or quantized weight.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
    bytes: usize,
}

#[derive(Debug, Clone)]
enum LinearWeight {
    /// llmesh's kernels over the stored blocks.
    Packed(Arc<QMatrix>),
    /// candle (dense f32, or storage types without an llmesh kernel).
    Candle(QMatMul),
}

impl Linear {
    fn new(weight: Weight, bias: Option<Tensor>) -> Self {
        let bytes = weight.size_in_bytes() + bias.as_ref().map_or(0, |b| b.elem_count() * 4);
        let weight = match weight {
            Weight::Dense(t) => LinearWeight::Candle(QMatMul::Tensor(t)),
            Weight::Packed(m) => LinearWeight::Packed(m),
            Weight::Quantized(q) => LinearWeight::Candle(QMatMul::QTensor(q)),
        };
        Linear {
            weight,
            bias,
            bytes,
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            LinearWeight::Candle(w) => w.forward(x)?,
            LinearWeight::Packed(w) => packed_matmul(w, x)?,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// `x Wᵀ` for each of `linears` (which take the same input): one fused product when all use
/// llmesh's kernels (see `QMatrix::matmul_many`), else one product each.
fn forward_many<const N: usize>(linears: [&Linear; N], x: &Tensor) -> Result<[Tensor; N]> {
    let packed: Vec<&QMatrix> = linears
        .iter()
        .filter_map(|l| match &l.weight {
            LinearWeight::Packed(w) => Some(&**w),
            LinearWeight::Candle(_) => None,
        })
        .collect();
    let mut out = Vec::with_capacity(N);
    if packed.len() < N {
        for l in linears {
            out.push(l.forward(x)?);
        }
    } else {
        for (y, l) in packed_matmuls(&packed, x)?.into_iter().zip(linears) {
            out.push(match &l.bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            });
        }
    }
    out.try_into()
        .map_err(|_| Error::Invalid("a projection is missing".into()))
}

/// `x Wᵀ` for `x` of shape `[..., cols]` (f32) with llmesh's kernels.
fn packed_matmul(w: &QMatrix, x: &Tensor) -> Result<Tensor> {
    packed_matmuls(&[w], x)?
        .pop()
        .ok_or_else(|| Error::Invalid("a projection is missing".into()))
}

/// `x Wᵢᵀ` for each of `ws`, in one parallel product.
fn packed_matmuls(ws: &[&QMatrix], x: &Tensor) -> Result<Vec<Tensor>> {
    let (ys, dims) = packed_outputs(ws, x)?;
    ys.into_iter()
        .zip(ws)
        .map(|(y, w)| Ok(Tensor::from_vec(y, out_dims(&dims, w), &Device::Cpu)?))
        .collect()
}

/// The values of `x Wᵢᵀ` for each of `ws` (one parallel product), and the dimensions of `x`.
fn packed_outputs(ws: &[&QMatrix], x: &Tensor) -> Result<(Vec<Vec<f32>>, Vec<usize>)> {
    let dims = x.dims().to_vec();
    let k = dims.last().copied().unwrap_or(0);
    let m = x.elem_count() / k.max(1);
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    let mut ys: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; m * w.rows()]).collect();
    with_f32_slice(&x, |xs| {
        let mut outs: Vec<&mut [f32]> = ys.iter_mut().map(Vec::as_mut_slice).collect();
        QMatrix::matmul_many(ws, xs, m, &mut outs).map_err(|e| Error::Invalid(e.to_string()))
    })?;
    Ok((ys, dims))
}

/// The dimensions of `x Wᵀ` for `x` of dimensions `dims`.
fn out_dims(dims: &[usize], w: &QMatrix) -> Vec<usize> {
    let mut out = dims.to_vec();
    if let Some(last) = out.last_mut() {
        *last = w.rows();
    }
    out
}

/// Calls `f` with the values of a contiguous f32 CPU tensor, without copying them.
fn with_f32_slice<T>(x: &Tensor, f: impl FnOnce(&[f32]) -> Result<T>) -> Result<T> {
    with_slice::<f32, T>(x, f)
}

/// Two tensors' values in place (see [`with_slice`]).
fn with_slices<E: candle_core::WithDType, T>(
    a: &Tensor,
    b: &Tensor,
    f: impl FnOnce(&[E], &[E]) -> Result<T>,
) -> Result<T> {
    with_slice::<E, _>(a, |a| with_slice::<E, _>(b, |b| f(a, b)))
}

/// `x`'s values in place, as a slice of `E` (the tensor's own type).
fn with_slice<E: candle_core::WithDType, T>(
    x: &Tensor,
    f: impl FnOnce(&[E]) -> Result<T>,
) -> Result<T> {
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(Error::Invalid("llmesh kernels run on CPU tensors".into()));
    };
    let all = cpu.as_slice::<E>()?;
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| Error::Invalid("a kernel input must be contiguous".into()))?;
    f(&all[start..end])
}

#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn load(src: &dyn WeightSource, name: WeightName, len: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            weight: src.vector(name, len)?,
            eps: eps as f32,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(x, &self.weight, self.eps)?)
    }
}

#[derive(Debug, Clone)]
enum Embedding {
    Dense(Tensor),
    Packed(Arc<QMatrix>),
    Quantized(Arc<candle_core::quantized::QTensor>),
}

impl Embedding {
    fn forward(&self, ids: &[u32]) -> Result<Tensor> {
        Ok(match self {
            Embedding::Dense(t) => t.index_select(&Tensor::new(ids, &Device::Cpu)?, 0)?,
            Embedding::Packed(m) => {
                let width = m.cols();
                let mut out = vec![0f32; ids.len() * width];
                for (o, &id) in out.chunks_exact_mut(width).zip(ids) {
                    m.dequantize_row_into(id as usize, o);
                }
                Tensor::from_vec(out, (ids.len(), width), &Device::Cpu)?
            }
            Embedding::Quantized(q) => q.embedding(&Tensor::new(ids, &Device::Cpu)?)?,
        })
    }

    fn size_in_bytes(&self) -> usize {
        match self {
            Embedding::Dense(t) => t.elem_count() * 4,
            Embedding::Packed(m) => m.size_in_bytes(),
            Embedding::Quantized(q) => q.storage_size_in_bytes(),
        }
    }

    fn into_weight(self) -> Weight {
        match self {
            Embedding::Dense(t) => Weight::Dense(t),
            Embedding::Packed(m) => Weight::Packed(m),
            Embedding::Quantized(q) => Weight::Quantized(q),
        }
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    sliding_window: Option<usize>,
}

struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

impl Attention {
    fn load(src: &dyn WeightSource, i: usize, cfg: &ModelConfig) -> Result<Self> {
        let name = |w| WeightName::Layer(i, w);
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let (q_out, kv_out) = (cfg.num_heads * d, cfg.num_kv_heads * d);
        let bias = |w, len| -> Result<Option<Tensor>> {
            if cfg.qkv_bias {
                Ok(Some(src.vector(name(w), len)?))
            } else {
                Ok(None)
            }
        };
        let norm = |w| -> Result<Option<RmsNorm>> {
            if cfg.arch.has_qk_norm() {
                Ok(Some(RmsNorm::load(src, name(w), d, cfg.rms_norm_eps)?))
            } else {
                Ok(None)
            }
        };
        Ok(Attention {
            q: Linear::new(
                src.matrix(name(LayerWeight::Q), q_out, h)?,
                bias(LayerWeight::QBias, q_out)?,
            ),
            k: Linear::new(
                src.matrix(name(LayerWeight::K), kv_out, h)?,
                bias(LayerWeight::KBias, kv_out)?,
            ),
            v: Linear::new(
                src.matrix(name(LayerWeight::V), kv_out, h)?,
                bias(LayerWeight::VBias, kv_out)?,
            ),
            o: Linear::new(src.matrix(name(LayerWeight::O), h, q_out)?, None),
            q_norm: norm(LayerWeight::QNorm)?,
            k_norm: norm(LayerWeight::KNorm)?,
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: d,
            sliding_window: cfg.sliding_window,
        })
    }

    fn size_in_bytes(&self) -> usize {
        let norms = self.q_norm.as_ref().map_or(0, |_| 2 * self.head_dim * 4);
        self.q.bytes + self.k.bytes + self.v.bytes + self.o.bytes + norms
    }

    /// A projection `[1, t, heads × head_dim]` as `[1, heads, t, head_dim]`, each head
    /// normalised if the model does.
    fn heads(&self, y: Tensor, norm: Option<&RmsNorm>, heads: usize) -> Result<Tensor> {
        let (b, t, _) = y.dims3()?;
        let y = y.reshape((b, t, heads, self.head_dim))?;
        let y = match norm {
            Some(n) => n.forward(&y)?,
            None => y,
        };
        Ok(y.transpose(1, 2)?.contiguous()?)
    }

    fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        cache: &mut KvCache,
        rotary: &Rotary,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        if b != 1 {
            return Err(Error::Invalid(format!(
                "attention runs one sequence at a time, not {b}"
            )));
        }
        let [q, k, v] = forward_many([&self.q, &self.k, &self.v], x)?;
        let q = self.heads(q, self.q_norm.as_ref(), self.num_heads)?;
        let k = self.heads(k, self.k_norm.as_ref(), self.num_kv_heads)?;
        let v = self.heads(v, None, self.num_kv_heads)?;
        let q = candle_nn::rotary_emb::rope(&q, &rotary.cos, &rotary.sin)?;
        let k = candle_nn::rotary_emb::rope(&k, &rotary.cos, &rotary.sin)?;
        cache.append(layer, &k, &v)?;
        let scale = (1.0 / (self.head_dim as f64).sqrt()) as f32;
        let out = self.attend_cached(&q, cache, layer, t, cache.len() + t, scale)?;
        self.o.forward(&out)
    }
}

impl Attention {
    /// The attention of the last `t` of the `total` cached positions of layer `layer`
    /// (`q`: `[1, heads, t, head_dim]`), each over the positions up to itself (the last
    /// `sliding_window` of them where the model has one), read from the cache buffers in place;
    /// `[1, t, heads × head_dim]`.
    fn attend_cached(
        &self,
        q: &Tensor,
        cache: &KvCache,
        layer: usize,
        t: usize,
        total: usize,
        scale: f32,
    ) -> Result<Tensor> {
        let (keys, values) = cache
            .buffers(layer)
            .ok_or_else(|| Error::Invalid("attention before the cache was written".into()))?;
        let shape = AttnShape {
            heads: self.num_heads,
            kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
            capacity: keys.dim(2)?,
        };
        let width = self.num_heads * self.head_dim;
        let q = q.to_dtype(DType::F32)?.contiguous()?;
        let mut out = vec![0f32; t * width];
        let w = self.sliding_window;
        let failed = |e: llmesh_kernels::KernelError| Error::Invalid(e.to_string());
        with_f32_slice(&q, |q| match cache.kv_type() {
            KvType::F32 => with_slices::<f32, _>(keys, values, |k, v| {
                attend_causal(Backend::Auto, shape, q, t, total, w, k, v, scale, &mut out)
                    .map_err(failed)
            }),
            KvType::F16 => with_slices::<half::f16, _>(keys, values, |k, v| {
                attend_causal(Backend::Auto, shape, q, t, total, w, k, v, scale, &mut out)
                    .map_err(failed)
            }),
        })?;
        Ok(Tensor::from_vec(out, (1, t, width), &Device::Cpu)?)
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Mlp {
    fn load(src: &dyn WeightSource, i: usize, cfg: &ModelConfig) -> Result<Self> {
        let name = |w| WeightName::Layer(i, w);
        let (h, f) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Mlp {
            gate: Linear::new(src.matrix(name(LayerWeight::Gate), f, h)?, None),
            up: Linear::new(src.matrix(name(LayerWeight::Up), f, h)?, None),
            down: Linear::new(src.matrix(name(LayerWeight::Down), h, f)?, None),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let (LinearWeight::Packed(g), LinearWeight::Packed(u), None, None) = (
            &self.gate.weight,
            &self.up.weight,
            &self.gate.bias,
            &self.up.bias,
        ) {
            // One product for gate and up, then silu(gate) × up in place on their values.
            let (mut ys, dims) = packed_outputs(&[g, u], x)?;
            let up = ys.pop().unwrap_or_default();
            let mut gate = ys.pop().unwrap_or_default();
            silu_mul(&mut gate, &up).map_err(|e| Error::Invalid(e.to_string()))?;
            let h = Tensor::from_vec(gate, out_dims(&dims, g), &Device::Cpu)?;
            return self.down.forward(&h);
        }
        let [gate, up] = forward_many([&self.gate, &self.up], x)?;
        self.down.forward(&(candle_nn::ops::silu(&gate)? * up)?)
    }
}

#[derive(Debug, Clone)]
struct Block {
    attn_norm: RmsNorm,
    attn: Attention,
    mlp_norm: RmsNorm,
    mlp: Mlp,
}

impl Block {
    fn load(src: &dyn WeightSource, i: usize, cfg: &ModelConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Block {
            attn_norm: RmsNorm::load(
                src,
                WeightName::Layer(i, LayerWeight::AttnNorm),
                h,
                cfg.rms_norm_eps,
            )?,
            attn: Attention::load(src, i, cfg)?,
            mlp_norm: RmsNorm::load(
                src,
                WeightName::Layer(i, LayerWeight::MlpNorm),
                h,
                cfg.rms_norm_eps,
            )?,
            mlp: Mlp::load(src, i, cfg)?,
        })
    }

    fn size_in_bytes(&self) -> usize {
        self.attn.size_in_bytes() + self.mlp.gate.bytes + self.mlp.up.bytes + self.mlp.down.bytes
    }

    fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        cache: &mut KvCache,
        rotary: &Rotary,
    ) -> Result<Tensor> {
        let h = self
            .attn
            .forward(&self.attn_norm.forward(x)?, layer, cache, rotary)?;
        let x = (x + h)?;
        let h = self.mlp.forward(&self.mlp_norm.forward(&x)?)?;
        Ok((x + h)?)
    }
}

#[derive(Debug, Clone)]
struct Head {
    norm: RmsNorm,
    output: Linear,
}

/// The layers `[start, end)` of a model, loaded and ready to run.
#[derive(Debug, Clone)]
pub struct Shard {
    config: Arc<ModelConfig>,
    range: LayerRange,
    embed: Option<Embedding>,
    blocks: Vec<Block>,
    head: Option<Head>,
    inv_freq: Tensor,
    kv_type: KvType,
}

impl Shard {
    /// Loads the layers in `range` (plus the embedding for the first range, and the final norm
    /// and output head for the last) from `src`. Nothing else is read.
    pub fn load(
        src: &dyn WeightSource,
        config: Arc<ModelConfig>,
        range: LayerRange,
    ) -> Result<Self> {
        let cfg = &*config;
        let range = LayerRange::new(range.start, range.end, cfg.num_layers)?;
        let is_last = range.end == cfg.num_layers;
        let embed = if range.start == 0 || (is_last && cfg.tie_word_embeddings) {
            Some(
                match src.matrix(WeightName::Embed, cfg.vocab_size, cfg.hidden_size)? {
                    Weight::Dense(t) => Embedding::Dense(t),
                    Weight::Packed(m) => Embedding::Packed(m),
                    Weight::Quantized(q) => Embedding::Quantized(q),
                },
            )
        } else {
            None
        };
        let mut blocks = Vec::with_capacity(range.len());
        for i in range.start..range.end {
            blocks.push(Block::load(src, i, cfg)?);
        }
        let head = if is_last {
            let norm = RmsNorm::load(
                src,
                WeightName::FinalNorm,
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?;
            let weight = if cfg.tie_word_embeddings && !src.contains(WeightName::LmHead) {
                match embed.as_ref() {
                    Some(e) => e.clone().into_weight(),
                    None => {
                        return Err(Error::Invalid(
                            "tied output head without an embedding".into(),
                        ));
                    }
                }
            } else {
                src.matrix(WeightName::LmHead, cfg.vocab_size, cfg.hidden_size)?
            };
            Some(Head {
                norm,
                output: Linear::new(weight, None),
            })
        } else {
            None
        };
        // The last shard of a tied model loads the embedding only for its head.
        let embed = if range.start == 0 { embed } else { None };
        let inv_freq = Tensor::new(cfg.rope.inv_freq(cfg.head_dim), &Device::Cpu)?;
        Ok(Shard {
            config,
            range,
            embed,
            blocks,
            head,
            inv_freq,
            kv_type: KvType::default(),
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The layers this shard runs.
    pub fn range(&self) -> LayerRange {
        self.range
    }

    /// Whether this shard takes token ids.
    pub fn is_first(&self) -> bool {
        self.range.start == 0
    }

    /// Whether this shard produces logits.
    pub fn is_last(&self) -> bool {
        self.range.end == self.config.num_layers
    }

    /// Bytes of weights held in memory.
    pub fn weight_bytes(&self) -> usize {
        let embed = self.embed.as_ref().map_or(0, Embedding::size_in_bytes);
        let head = self
            .head
            .as_ref()
            .map_or(0, |h| h.output.bytes + h.norm.weight.elem_count() * 4);
        embed + head + self.blocks.iter().map(Block::size_in_bytes).sum::<usize>()
    }

    /// Bytes of the token embedding held by this shard (0 unless it is the first).
    pub fn embedding_bytes(&self) -> usize {
        self.embed.as_ref().map_or(0, Embedding::size_in_bytes)
    }

    /// A fresh cache for one sequence through this shard.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(
            self.blocks.len(),
            self.config.max_position_embeddings,
            self.kv_type,
        )
    }

    /// How this shard's caches store keys and values.
    pub fn kv_type(&self) -> KvType {
        self.kv_type
    }

    /// The shard, its caches storing keys and values as `kv`.
    pub fn with_kv_type(mut self, kv: KvType) -> Self {
        self.kv_type = kv;
        self
    }

    /// Bytes of KV cache one position takes in this shard.
    pub fn kv_bytes_per_position(&self) -> usize {
        self.blocks.len() * self.config.kv_bytes_per_position_layer(self.kv_type)
    }

    /// Runs this shard's layers on the next positions of the sequence whose cache is `cache`.
    ///
    /// The work runs on a thread of the compute pool, so that the many short parallel products
    /// of a step start on the calling worker at once instead of waiting for a sleeping one.
    pub fn forward(
        &self,
        cache: &mut KvCache,
        input: ShardInput<'_>,
        logits: LogitsFor,
    ) -> Result<ShardOutput> {
        rayon::scope(|_| self.forward_on_pool(cache, input, logits))
    }

    fn forward_on_pool(
        &self,
        cache: &mut KvCache,
        input: ShardInput<'_>,
        logits: LogitsFor,
    ) -> Result<ShardOutput> {
        let x = match (input, &self.embed) {
            (ShardInput::Tokens(ids), Some(embed)) => {
                if ids.is_empty() {
                    return Err(Error::Invalid("no tokens to process".into()));
                }
                if let Some(&bad) = ids
                    .iter()
                    .find(|&&id| id as usize >= self.config.vocab_size)
                {
                    return Err(Error::Invalid(format!(
                        "token id {bad} is out of range for a vocabulary of {}",
                        self.config.vocab_size
                    )));
                }
                embed.forward(ids)?.unsqueeze(0)?
            }
            (ShardInput::Hidden(h), None) => {
                let (b, _, width) = h.dims3()?;
                if b != 1 || width != self.config.hidden_size {
                    return Err(Error::Invalid(format!(
                        "hidden states of shape {:?} do not fit a model of width {}",
                        h.dims(),
                        self.config.hidden_size
                    )));
                }
                h.to_dtype(DType::F32)?
            }
            (ShardInput::Tokens(_), None) => {
                return Err(Error::Invalid(format!(
                    "shard {} takes hidden states, not tokens",
                    self.range
                )));
            }
            (ShardInput::Hidden(_), Some(_)) => {
                return Err(Error::Invalid(format!(
                    "shard {} takes tokens, not hidden states",
                    self.range
                )));
            }
        };
        let t = x.dim(1)?;
        cache.check_room(t)?;
        let start = cache.len();
        let rotary = self.rotary(start, t)?;
        let mut x = x;
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward(&x, i, cache, &rotary)?;
        }
        cache.advance(t);
        match &self.head {
            None => Ok(ShardOutput::Hidden(x)),
            Some(head) => {
                let x = match logits {
                    LogitsFor::Last => x.narrow(1, t - 1, 1)?,
                    LogitsFor::All => x,
                };
                let y = head.output.forward(&head.norm.forward(&x)?)?;
                Ok(ShardOutput::Logits(y.squeeze(0)?.to_dtype(DType::F32)?))
            }
        }
    }

    fn rotary(&self, start: usize, t: usize) -> Result<Rotary> {
        let positions =
            Tensor::arange(start as u32, (start + t) as u32, &Device::Cpu)?.to_dtype(DType::F32)?;
        let freqs = positions
            .unsqueeze(1)?
            .broadcast_mul(&self.inv_freq.unsqueeze(0)?)?;
        Ok(Rotary {
            cos: freqs.cos()?.contiguous()?,
            sin: freqs.sin()?.contiguous()?,
        })
    }
}

/// Softmax over the last dimension in f32 (kept here so callers need not depend on candle-nn).
pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::log_softmax(
        &logits.to_dtype(DType::F32)?,
        D::Minus1,
    )?)
}
