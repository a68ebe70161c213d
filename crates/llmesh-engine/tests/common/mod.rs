//! Shared helpers for the engine's integration tests: generated models (made once per test
//! binary) and tensor comparisons.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use candle_core::Tensor;
use llmesh_engine::Architecture;
use llmesh_engine::gguf_export::FileType;
use llmesh_engine::synth::{SynthModel, SynthSpec, make_model};

static DIR: OnceLock<PathBuf> = OnceLock::new();
static MADE: Mutex<Vec<(String, SynthModel)>> = Mutex::new(Vec::new());

/// This test process's directory for generated models, under cargo's target tmp directory
/// (see `synth::process_dir`).
fn dir() -> &'static PathBuf {
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("test binary path");
        let stem = exe.file_stem().and_then(|s| s.to_str()).unwrap_or("test");
        let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("engine-models");
        llmesh_engine::synth::process_dir(&root, stem).expect("model directory")
    })
}

/// A generated model, made on first use under a temporary directory shared by the test binary.
pub fn model(key: &str, spec: impl FnOnce() -> SynthSpec) -> SynthModel {
    let mut made = MADE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, m)) = made.iter().find(|(k, _)| k == key) {
        return m.clone();
    }
    let m = make_model(&spec(), &dir().join(key)).expect("make model");
    made.push((key.to_string(), m.clone()));
    m
}

/// The default model of an architecture with 6 layers and an F32 GGUF file.
pub fn arch_model(arch: Architecture) -> SynthModel {
    model(&format!("{arch}-6"), || {
        let mut s = SynthSpec::new(arch);
        s.layers = 6;
        s.gguf = vec![FileType::F32];
        s
    })
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// max |a - b| / max |b|.
pub fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let scale: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    let scale = scale.iter().map(|x| x.abs()).fold(0.0, f32::max).max(1e-12);
    max_abs_diff(a, b) / scale
}

pub fn tmp_path(name: &str) -> PathBuf {
    dir().join(name)
}

/// Prompt ids of a given length drawn deterministically from the vocabulary.
pub fn prompt_ids(vocab: usize, len: usize) -> Vec<u32> {
    (0..len).map(|i| ((i * 7919 + 13) % vocab) as u32).collect()
}

/// ||a - b|| / ||b||.
pub fn rms_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    let num: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| f64::from(x - y).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (num / den.max(1e-30)).sqrt() as f32
}
