//! A model split into consecutive layer ranges that pass activations computes the same logits as
//! the whole model, for every architecture; and prefill in chunks plus decode equals one pass.
#![allow(clippy::unwrap_used)]

mod common;

use candle_core::Tensor;
use llmesh_engine::{Architecture, LayerRange, LogitsFor, ModelFiles, Shard, ShardInput};

fn run_plan(shards: &[Shard], ids: &[u32]) -> Tensor {
    let mut caches: Vec<_> = shards.iter().map(Shard::new_cache).collect();
    let mut out = shards[0]
        .forward(&mut caches[0], ShardInput::Tokens(ids), LogitsFor::All)
        .unwrap();
    for (s, c) in shards.iter().zip(caches.iter_mut()).skip(1) {
        out = s
            .forward(
                c,
                ShardInput::Hidden(out.into_hidden().unwrap()),
                LogitsFor::All,
            )
            .unwrap();
    }
    out.into_logits().unwrap()
}

fn check_arch(arch: Architecture) {
    let m = common::arch_model(arch);
    let files = ModelFiles::open(&m.dir).unwrap();
    let n = files.config().num_layers;
    let ids = common::prompt_ids(files.config().vocab_size, 23);
    let whole = run_plan(&[files.load_full().unwrap()], &ids);
    assert_eq!(whole.dims(), &[23, files.config().vocab_size]);
    for cuts in [vec![0, 3, n], vec![0, 1, 4, n], vec![0, 2, 5, n]] {
        let shards: Vec<Shard> = cuts
            .windows(2)
            .map(|w| {
                files
                    .load_shard(LayerRange::new(w[0], w[1], n).unwrap())
                    .unwrap()
            })
            .collect();
        let split = run_plan(&shards, &ids);
        let d = common::max_abs_diff(&split, &whole);
        assert!(d <= 1e-4, "{arch} split at {cuts:?}: max abs diff {d}");
    }
}

#[test]
fn llama_split_equals_whole() {
    check_arch(Architecture::Llama);
}

#[test]
fn mistral_split_equals_whole() {
    check_arch(Architecture::Mistral);
}

#[test]
fn qwen2_split_equals_whole() {
    check_arch(Architecture::Qwen2);
}

#[test]
fn qwen3_split_equals_whole() {
    check_arch(Architecture::Qwen3);
}

/// Processing a sequence in chunks and then token by token (using the KV cache) gives the same
/// logits as one pass over the whole sequence.
#[test]
fn chunked_prefill_and_decode_equal_one_pass() {
    for arch in [Architecture::Llama, Architecture::Qwen3] {
        let m = common::arch_model(arch);
        let files = ModelFiles::open(&m.dir).unwrap();
        let shard = files.load_full().unwrap();
        let ids = common::prompt_ids(files.config().vocab_size, 40);
        let mut cache = shard.new_cache();
        let whole = shard
            .forward(&mut cache, ShardInput::Tokens(&ids), LogitsFor::All)
            .unwrap()
            .into_logits()
            .unwrap();
        let mut cache = shard.new_cache();
        let mut rows = Vec::new();
        let mut pos = 0;
        for len in [7, 13, 1, 1, 9, 1] {
            let part = &ids[pos..pos + len];
            rows.push(
                shard
                    .forward(&mut cache, ShardInput::Tokens(part), LogitsFor::All)
                    .unwrap()
                    .into_logits()
                    .unwrap(),
            );
            pos += len;
        }
        for &id in &ids[pos..] {
            rows.push(
                shard
                    .forward(&mut cache, ShardInput::Tokens(&[id]), LogitsFor::All)
                    .unwrap()
                    .into_logits()
                    .unwrap(),
            );
        }
        assert_eq!(cache.len(), ids.len());
        let stepped = Tensor::cat(&rows, 0).unwrap();
        // Different chunk shapes sum in a different order: compare relative to the logits' scale.
        let d = common::max_rel_diff(&stepped, &whole);
        assert!(d <= 1e-5, "{arch}: chunked vs whole max relative diff {d}");
    }
}

/// A sliding window restricts attention: with a window of 4, the last position's logits do not
/// depend on tokens more than 4 positions back, and split == whole still holds.
#[test]
fn sliding_window_limits_attention() {
    let m = common::model("mistral-window", || {
        let mut s = llmesh_engine::synth::SynthSpec::new(Architecture::Mistral);
        s.layers = 1;
        s.sliding_window = Some(4);
        s
    });
    let files = ModelFiles::open(&m.dir).unwrap();
    assert_eq!(files.config().sliding_window, Some(4));
    let shard = files.load_full().unwrap();
    let mut a = common::prompt_ids(files.config().vocab_size, 10);
    let last = |ids: &[u32]| {
        let mut c = shard.new_cache();
        shard
            .forward(&mut c, ShardInput::Tokens(ids), LogitsFor::Last)
            .unwrap()
            .into_logits()
            .unwrap()
    };
    let before = last(&a);
    a[0] = (a[0] + 1) % 100;
    a[4] = (a[4] + 1) % 100;
    let after = last(&a);
    // One layer: position 9 sees positions 6..=9 only.
    assert!(common::max_abs_diff(&before, &after) < 1e-6);
    a[7] = (a[7] + 1) % 100;
    let changed = last(&a);
    assert!(common::max_abs_diff(&before, &changed) > 1e-3);
    // Decoding one position at a time (past the window) attends over the same positions.
    let mut c = shard.new_cache();
    let mut stepped = None;
    for id in &a {
        stepped = Some(
            shard
                .forward(&mut c, ShardInput::Tokens(&[*id]), LogitsFor::Last)
                .unwrap()
                .into_logits()
                .unwrap(),
        );
    }
    let d = common::max_rel_diff(&stepped.unwrap(), &changed);
    assert!(
        d <= 1e-5,
        "stepped vs whole with a window: max relative diff {d}"
    );
}
