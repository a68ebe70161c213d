//! The key/value cache of one sequence for the layers of one shard. Keys and values are written
//! in place into buffers that grow geometrically, so a decode step copies only the new position.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// How a cache stores keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvType {
    /// 4 bytes a value, exactly what the layer computed.
    #[default]
    F32,
    /// 2 bytes a value (half the memory, and half the bytes a long context's attention
    /// reads), rounded to f16 as written (llama.cpp's default). The rounding magnifies the
    /// last-bit differences between a prompt computed in one pass and the same positions
    /// computed one by one, so a request replayed on a new plan after a lost node may sample
    /// differently from here on; with f32 it continues as it would have.
    F16,
}

impl KvType {
    /// Bytes one value takes.
    pub fn size_in_bytes(self) -> usize {
        self.dtype().size_in_bytes()
    }

    pub(crate) fn dtype(self) -> DType {
        match self {
            KvType::F32 => DType::F32,
            KvType::F16 => DType::F16,
        }
    }
}

impl std::fmt::Display for KvType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KvType::F32 => "f32",
            KvType::F16 => "f16",
        })
    }
}

impl std::str::FromStr for KvType {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(KvType::F32),
            "f16" => Ok(KvType::F16),
            _ => Err(Error::Invalid(format!(
                "`{s}` is not a KV cache type: use f32 or f16"
            ))),
        }
    }
}

const MIN_CAPACITY: usize = 64;

/// One layer's keys and values, `[1, kv_heads, capacity, head_dim]` each.
#[derive(Debug, Clone, Default)]
struct LayerCache {
    kv: Option<(Tensor, Tensor)>,
}

/// The cache of one sequence for a shard's layers.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    len: usize,
    capacity: usize,
    max_len: usize,
    kv: KvType,
}

impl KvCache {
    /// An empty cache for `layers` layers holding at most `max_len` positions as `kv`.
    pub fn new(layers: usize, max_len: usize, kv: KvType) -> Self {
        KvCache {
            layers: vec![LayerCache::default(); layers],
            len: 0,
            capacity: 0,
            max_len,
            kv,
        }
    }

    /// How the cache stores keys and values.
    pub fn kv_type(&self) -> KvType {
        self.kv
    }

    /// Number of positions already processed.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position has been processed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The most positions this cache accepts (the model's context length).
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Forgets every position from `len` on, so a sequence can be continued from a shared prefix.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Bytes of memory held by the cache buffers.
    pub fn size_in_bytes(&self) -> usize {
        self.layers
            .iter()
            .filter_map(|l| l.kv.as_ref())
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum()
    }

    /// Checks that `n` more positions fit.
    pub(crate) fn check_room(&self, n: usize) -> Result<()> {
        if self.len + n > self.max_len {
            return Err(Error::Invalid(format!(
                "context length exceeded: {} positions already cached + {n} new > {} allowed",
                self.len, self.max_len
            )));
        }
        Ok(())
    }

    /// Writes the keys and values of `t` new positions of layer `layer` (each
    /// `[1, kv_heads, t, head_dim]`) after the cached ones (see [`KvCache::buffers`]).
    pub(crate) fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        let (_, kv_heads, t, head_dim) = k.dims4()?;
        let needed = self.len + t;
        let entry = &mut self.layers[layer];
        let cap = entry.kv.as_ref().map_or(0, |(k, _)| k.dim(2).unwrap_or(0));
        if needed > cap {
            let new_cap = needed
                .max(cap * 2)
                .max(MIN_CAPACITY)
                .min(self.max_len.max(needed));
            let grow = |old: Option<&Tensor>| -> Result<Tensor> {
                let fresh = Tensor::zeros(
                    (1, kv_heads, new_cap, head_dim),
                    self.kv.dtype(),
                    &Device::Cpu,
                )?;
                if let Some(old) = old
                    && self.len > 0
                {
                    fresh.slice_set(&old.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                }
                Ok(fresh)
            };
            let nk = grow(entry.kv.as_ref().map(|(k, _)| k))?;
            let nv = grow(entry.kv.as_ref().map(|(_, v)| v))?;
            entry.kv = Some((nk, nv));
            self.capacity = self.capacity.max(new_cap);
        }
        let (ck, cv) = entry
            .kv
            .as_ref()
            .ok_or_else(|| Error::Invalid("cache not allocated".into()))?;
        let dtype = self.kv.dtype();
        ck.slice_set(&k.to_dtype(dtype)?.contiguous()?, 2, self.len)?;
        cv.slice_set(&v.to_dtype(dtype)?.contiguous()?, 2, self.len)?;
        Ok(())
    }

    /// Layer `layer`'s whole key and value buffers (`[1, kv_heads, capacity, head_dim]` of the
    /// cache's type, contiguous; positions past those appended hold nothing meaningful), once anything has
    /// been appended to it.
    pub(crate) fn buffers(&self, layer: usize) -> Option<&(Tensor, Tensor)> {
        self.layers.get(layer).and_then(|l| l.kv.as_ref())
    }

    /// Marks `t` positions as processed by every layer.
    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }
}
