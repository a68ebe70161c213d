//! Loading half of a model's layers maps and touches about half of its weight bytes: the peak
//! resident memory of a process that loads layers 0..8 of 16 stays within 55% of the whole
//! model's weights plus 100 MiB, for safetensors (single and sharded) and GGUF.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use llmesh_engine::Architecture;
use llmesh_engine::gguf_export::FileType;
use llmesh_engine::synth::{SynthSpec, make_model};

fn load(model: &Path, layers: &str) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_llmesh"))
        .args(["dev", "load", "--model"])
        .arg(model)
        .args(["--layers", layers])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn half_the_layers_take_about_half_the_memory() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = SynthSpec::new(Architecture::Llama);
    spec.layers = 16;
    spec.hidden = 512;
    spec.heads = 8;
    spec.kv_heads = 2;
    spec.head_dim = 64;
    spec.intermediate = 2048;
    spec.shards = 3;
    spec.gguf = vec![FileType::Q8_0];
    let m = make_model(&spec, &dir.path().join("m")).unwrap();
    let gguf = m.gguf_path(FileType::Q8_0).unwrap().to_path_buf();
    for model in [m.dir.clone(), gguf] {
        let full = load(&model, "0..16");
        let full_bytes = full["weight_bytes"].as_u64().unwrap();
        for half in ["0..8", "8..16"] {
            let h = load(&model, half);
            let weights = h["weight_bytes"].as_u64().unwrap();
            let peak = h["peak_rss_bytes"].as_u64().unwrap();
            let limit = full_bytes * 55 / 100 + (100 << 20);
            eprintln!(
                "{} {half}: weights {weights} of {full_bytes}, peak RSS {peak}, limit {limit}",
                model.display()
            );
            assert!(
                weights * 100 <= full_bytes * 52,
                "{half} holds {weights} of {full_bytes} bytes"
            );
            assert!(
                peak <= limit,
                "{}: {half} peak RSS {peak} > {limit}",
                model.display()
            );
        }
    }
}
