//! A half-precision KV cache holds the same positions in half the bytes and gives logits close
//! to the f32 cache's, through prefill, chunks and decode, for every architecture.
#![allow(clippy::unwrap_used)]

mod common;

use candle_core::Tensor;
use llmesh_engine::{Architecture, KvType, LogitsFor, ModelFiles, ShardInput};

/// Logits of every position of `ids`, fed as a 9-token prompt, a chunk of 5 and then one token
/// at a time (so prefill, chunked prefill and decode all read the cache), and the cache's bytes.
fn logits(files: &ModelFiles, ids: &[u32]) -> (Tensor, usize) {
    let shard = files.load_full().unwrap();
    let mut cache = shard.new_cache();
    assert_eq!(cache.kv_type(), files.kv_type());
    let mut rows = Vec::new();
    let mut feed = |part: &[u32]| {
        rows.push(
            shard
                .forward(&mut cache, ShardInput::Tokens(part), LogitsFor::All)
                .unwrap()
                .into_logits()
                .unwrap(),
        );
    };
    feed(&ids[..9]);
    feed(&ids[9..14]);
    for id in &ids[14..] {
        feed(std::slice::from_ref(id));
    }
    (Tensor::cat(&rows, 0).unwrap(), cache.size_in_bytes())
}

#[test]
fn half_precision_cache_is_half_the_size_and_close() {
    for arch in [
        Architecture::Llama,
        Architecture::Qwen3,
        Architecture::Mistral,
    ] {
        let m = common::arch_model(arch);
        let f32_files = ModelFiles::open(&m.dir).unwrap();
        let ids = common::prompt_ids(f32_files.config().vocab_size, 30);
        assert_eq!(f32_files.kv_type(), KvType::F32, "f32 is the default");
        let (exact, full_bytes) = logits(&f32_files, &ids);
        let half_files = ModelFiles::open(&m.dir).unwrap().with_kv_type(KvType::F16);
        let (half, half_bytes) = logits(&half_files, &ids);
        assert_eq!(2 * half_bytes, full_bytes, "{arch}");
        let shard = half_files.load_full().unwrap();
        assert_eq!(
            2 * shard.kv_bytes_per_position(),
            f32_files.load_full().unwrap().kv_bytes_per_position()
        );
        // f16 keeps 11 significant bits: logits move by about that, relative to their scale.
        let d = common::max_rel_diff(&half, &exact);
        assert!(
            d > 0.0 && d <= 1e-2,
            "{arch}: f16 cache vs f32 max relative diff {d}"
        );
    }
}
