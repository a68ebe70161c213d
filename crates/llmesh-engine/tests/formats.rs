//! The same weights give the same logits whatever file they come from: safetensors (single or
//! sharded, f32/f16/bf16) and GGUF (F32, and the half and quantized types within their error).
#![allow(clippy::unwrap_used)]

mod common;

use candle_core::Tensor;
use llmesh_engine::gguf_export::FileType;
use llmesh_engine::synth::{StDtype, SynthSpec};
use llmesh_engine::{Architecture, LogitsFor, ModelFiles, ModelFormat, ShardInput};

fn logits(path: &std::path::Path, ids: &[u32]) -> Tensor {
    let files = ModelFiles::open(path).unwrap();
    let shard = files.load_full().unwrap();
    let mut cache = shard.new_cache();
    shard
        .forward(&mut cache, ShardInput::Tokens(ids), LogitsFor::All)
        .unwrap()
        .into_logits()
        .unwrap()
}

fn gguf_f32_equals_safetensors(arch: Architecture) {
    let m = common::arch_model(arch);
    let ids = common::prompt_ids(m.config.vocab_size, 19);
    let st = logits(&m.dir, &ids);
    let gguf_path = m.gguf_path(FileType::F32).unwrap();
    let files = ModelFiles::open(gguf_path).unwrap();
    assert_eq!(files.format(), ModelFormat::Gguf);
    // The configuration read from GGUF metadata is the one config.json describes.
    let mut expected = m.config.clone();
    if let Some(f) = m.config.rope.freq_factors(m.config.head_dim) {
        expected.rope.scaling = Some(llmesh_engine::config::RopeScaling::Factors(f));
    }
    let got = files.config().as_ref().clone();
    assert_eq!(got.arch.gguf_name(), expected.arch.gguf_name());
    assert_eq!(
        (
            got.hidden_size,
            got.num_layers,
            got.num_heads,
            got.num_kv_heads,
            got.head_dim
        ),
        (
            expected.hidden_size,
            expected.num_layers,
            expected.num_heads,
            expected.num_kv_heads,
            expected.head_dim
        )
    );
    assert_eq!(got.tie_word_embeddings, expected.tie_word_embeddings);
    assert_eq!(got.qkv_bias, expected.qkv_bias);
    let gg = logits(gguf_path, &ids);
    let d = common::max_rel_diff(&gg, &st);
    assert!(
        d <= 1e-4,
        "{arch}: GGUF F32 vs safetensors max relative diff {d}"
    );
}

#[test]
fn llama_gguf_f32_equals_safetensors() {
    // Exercises llama.cpp's q/k row permutation and Llama 3.1 rope factors (rope_freqs.weight).
    gguf_f32_equals_safetensors(Architecture::Llama);
}

#[test]
fn qwen3_gguf_f32_equals_safetensors() {
    gguf_f32_equals_safetensors(Architecture::Qwen3);
}

#[test]
fn mistral_and_qwen2_gguf_f32_equal_safetensors() {
    gguf_f32_equals_safetensors(Architecture::Mistral);
    gguf_f32_equals_safetensors(Architecture::Qwen2);
}

#[test]
fn sharded_checkpoint_equals_single_file() {
    let single = common::arch_model(Architecture::Llama);
    let sharded = common::model("llama-6-sharded", || {
        let mut s = SynthSpec::new(Architecture::Llama);
        s.layers = 6;
        s.shards = 3;
        s
    });
    assert!(sharded.dir.join("model.safetensors.index.json").is_file());
    assert!(
        sharded
            .dir
            .join("model-00003-of-00003.safetensors")
            .is_file()
    );
    let ids = common::prompt_ids(single.config.vocab_size, 11);
    assert_eq!(
        common::max_abs_diff(&logits(&sharded.dir, &ids), &logits(&single.dir, &ids)),
        0.0
    );
}

/// Half-precision checkpoints stay half precision in memory, and GGUF files of the same type
/// give the same logits.
#[test]
fn half_precision_safetensors_equal_gguf_of_the_same_type() {
    for (dtype, ft, key) in [
        (StDtype::F16, FileType::F16, "qwen2-f16"),
        (StDtype::BF16, FileType::BF16, "qwen2-bf16"),
    ] {
        let m = common::model(key, || {
            let mut s = SynthSpec::new(Architecture::Qwen2);
            s.dtype = dtype;
            s.gguf = vec![ft];
            s
        });
        let ids = common::prompt_ids(m.config.vocab_size, 9);
        let files = ModelFiles::open(&m.dir).unwrap();
        let shard = files.load_full().unwrap();
        let f32_bytes = m.config.layer_param_count() * m.config.num_layers * 4;
        assert!(
            shard.weight_bytes() < f32_bytes * 3 / 4,
            "{dtype:?} weights were widened"
        );
        let st = logits(&m.dir, &ids);
        let gg = logits(m.gguf_path(ft).unwrap(), &ids);
        let d = common::max_rel_diff(&gg, &st);
        assert!(d <= 1e-4, "{dtype:?}: max relative diff {d}");
    }
}

/// Every quantized GGUF type loads, stays quantized, and gives logits whose greedy choice
/// mostly agrees with f32 (within the format's error).
#[test]
fn quantized_gguf_types_run_close_to_f32() {
    let types = [
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
    let m = common::model("llama-quant", || {
        let mut s = SynthSpec::new(Architecture::Llama);
        s.gguf = types.to_vec();
        s
    });
    let ids = common::prompt_ids(m.config.vocab_size, 16);
    let reference = logits(&m.dir, &ids);
    let f32_weight_bytes = ModelFiles::open(&m.dir)
        .unwrap()
        .load_full()
        .unwrap()
        .weight_bytes();
    for t in types {
        let path = m.gguf_path(t).unwrap();
        let shard = ModelFiles::open(path).unwrap().load_full().unwrap();
        assert!(
            shard.weight_bytes() * 3 < f32_weight_bytes,
            "{t}: weights not kept quantized"
        );
        let got = logits(path, &ids);
        let rel = common::rms_rel_diff(&got, &reference);
        eprintln!("{t}: relative RMS error of logits {rel:.4}");
        let limit = match t {
            // About twice the error measured; each bit less roughly doubles it. Unrelated
            // logits would be near sqrt(2).
            FileType::Q8_0 => 0.03,
            FileType::Q6K => 0.07,
            FileType::Q5_0 | FileType::Q5_1 | FileType::Q5K | FileType::Q5KM => 0.13,
            FileType::Q4_0 | FileType::Q4_1 | FileType::Q4K | FileType::Q4KM => 0.25,
            FileType::Q3K => 0.45,
            _ => 0.8,
        };
        assert!(rel < limit, "{t}: relative RMS error {rel}");
    }
}
