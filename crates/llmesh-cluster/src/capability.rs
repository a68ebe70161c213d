//! What a node offers: memory for weights and cache, and its measured speed on the model —
//! a short micro-benchmark of one layer, cached in the data directory — and a fingerprint that
//! tells whether two nodes hold the same model.

use std::io::Read;
use std::path::Path;
use std::time::Instant;

use llmesh_engine::{LayerRange, LogitsFor, ModelFiles, ModelFormat, ShardInput};
use sha2::{Digest, Sha256};

use crate::wire::ModelAdvert;

/// A fingerprint of a model's files: equal for copies of the same weights on different machines.
pub fn fingerprint(files: &ModelFiles) -> String {
    let mut h = Sha256::new();
    let mut take = |path: &Path, limit: u64| {
        if let Ok(meta) = std::fs::metadata(path) {
            h.update(meta.len().to_le_bytes());
        }
        if let Ok(f) = std::fs::File::open(path) {
            let mut buf = Vec::new();
            let _ = f.take(limit).read_to_end(&mut buf);
            h.update(&buf);
        }
    };
    match files.format() {
        // The header (metadata and tensor directory) and the file size.
        ModelFormat::Gguf => take(files.path(), 8 << 20),
        ModelFormat::HuggingFace => {
            take(&files.path().join("config.json"), 1 << 20);
            let mut shards: Vec<_> = std::fs::read_dir(files.path())
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                .collect();
            shards.sort();
            for p in shards {
                take(&p, 1 << 20);
            }
        }
    }
    h.finalize()
        .iter()
        .take(12)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Seconds to run one layer for one token, measured on a middle layer after a short prompt.
pub fn measure_seconds_per_layer(files: &ModelFiles) -> Result<f64, llmesh_engine::Error> {
    let cfg = files.config();
    let mid = cfg.num_layers / 2;
    let first = mid == 0;
    let range = LayerRange::new(mid, mid + 1, cfg.num_layers)?;
    let shard = files.load_shard(range)?;
    let mut cache = shard.new_cache();
    let prompt: Vec<u32> = (0..32).map(|i| (i % cfg.vocab_size) as u32).collect();
    let run =
        |cache: &mut llmesh_engine::KvCache, ids: &[u32]| -> Result<(), llmesh_engine::Error> {
            let input = if first {
                ShardInput::Tokens(ids)
            } else {
                ShardInput::Hidden(candle_core::Tensor::zeros(
                    (1, ids.len(), cfg.hidden_size),
                    candle_core::DType::F32,
                    &candle_core::Device::Cpu,
                )?)
            };
            shard.forward(cache, input, LogitsFor::Last)?;
            Ok(())
        };
    run(&mut cache, &prompt)?;
    // Average over at least half a second of wall time: a CPU quota (a busy or throttled
    // machine, a cgroup) lets short bursts run at full speed, so a few quick steps would
    // measure the burst, not the rate the node can sustain. The context stays at 32-64
    // positions.
    let t0 = Instant::now();
    let mut steps = 0usize;
    while steps < 8 || t0.elapsed() < std::time::Duration::from_millis(500) {
        if cache.len() >= 64 {
            cache.truncate(32);
        }
        run(&mut cache, &prompt[steps % 32..steps % 32 + 1])?;
        steps += 1;
    }
    Ok(t0.elapsed().as_secs_f64() / steps as f64)
}

/// The model facts a node advertises, with its speed measured (or read from the cache in
/// `data_dir` when this model was measured before with the same thread count).
pub fn advert(
    files: &ModelFiles,
    id: &str,
    data_dir: &Path,
    speed_override: Option<f64>,
) -> Result<ModelAdvert, llmesh_engine::Error> {
    let cfg = files.config();
    let fp = fingerprint(files);
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_default();
    let cache_path = data_dir.join("speed").join(format!("{fp}-{threads}"));
    let seconds_per_layer = match speed_override {
        Some(s) => s,
        None => match std::fs::read_to_string(&cache_path)
            .ok()
            .and_then(|t| t.trim().parse::<f64>().ok())
        {
            Some(s) => s,
            None => {
                let s = measure_seconds_per_layer(files)?;
                if let Some(parent) = cache_path.parent() {
                    let _ = std::fs::create_dir_all(parent);
                }
                let _ = std::fs::write(&cache_path, format!("{s}\n"));
                s
            }
        },
    };
    // Sizes in memory, from the configuration (quantized files: from the file's tensor sizes).
    let (layer_bytes, first_bytes, last_bytes) = sizes(files);
    let kv_bytes_per_token_layer = cfg.kv_bytes_per_position_layer(files.kv_type()) as u64;
    Ok(ModelAdvert {
        id: id.to_string(),
        fingerprint: fp,
        layers: cfg.num_layers as u32,
        layer_bytes,
        kv_bytes_per_token_layer,
        first_bytes,
        last_bytes,
        seconds_per_layer,
    })
}

/// Bytes in memory of one layer, of the embedding, and of the final norm plus output head.
fn sizes(files: &ModelFiles) -> (u64, u64, u64) {
    let cfg = files.config();
    let per_elem = |dtype_bytes: f64, n: usize| (n as f64 * dtype_bytes) as u64;
    let layer_params = cfg.layer_param_count();
    let embed_params = cfg.vocab_size * cfg.hidden_size;
    match files.format() {
        ModelFormat::Gguf => {
            let total = std::fs::metadata(files.path())
                .map(|m| m.len())
                .unwrap_or(0);
            // Quantized: bytes per parameter from the file as a whole.
            let params = layer_params * cfg.num_layers
                + embed_params * if cfg.tie_word_embeddings { 1 } else { 2 };
            let bpp = total as f64 / params.max(1) as f64;
            // The last shard holds the output head, or the tied embedding it reuses: either way
            // a vocabulary-by-width matrix.
            let embed = per_elem(bpp, embed_params);
            (per_elem(bpp, layer_params), embed, embed)
        }
        ModelFormat::HuggingFace => {
            let b = if files.f32_weights() { 4.0 } else { 2.0 };
            let embed = per_elem(b, embed_params);
            (per_elem(b, layer_params), embed, embed)
        }
    }
}
