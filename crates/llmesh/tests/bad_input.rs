//! Bad input gets a one-line message that names the file and the problem, a non-zero exit, and
//! never a panic: missing files, truncated or corrupt GGUF and safetensors, unknown
//! architectures, missing tensors, shape mismatches, and invalid settings.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use llmesh_engine::gguf::{self, MetaValue, TensorToWrite};
use llmesh_engine::gguf_export::FileType;
use llmesh_engine::synth::{SynthSpec, make_model};
use llmesh_engine::{Architecture, LayerRange, ModelFiles};

static MODEL: OnceLock<PathBuf> = OnceLock::new();

/// A small model (HF directory with a Q8_0 GGUF) shared by the tests; each test copies what it breaks.
fn model() -> &'static Path {
    MODEL.get_or_init(|| {
        // In a directory of this process (a TempDir in a static would never be removed).
        let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let dir = llmesh_engine::synth::process_dir(&root, "bad-input-model").unwrap();
        let mut spec = SynthSpec::new(Architecture::Llama);
        spec.layers = 2;
        spec.gguf = vec![FileType::Q8_0];
        let out = dir.join("m");
        make_model(&spec, &out).unwrap();
        out
    })
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Runs `llmesh generate` on `model` and returns stderr, asserting a clean failure.
fn fails(model: &Path, extra: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_llmesh"))
        .args(["generate", "--model"])
        .arg(model)
        .args(["--prompt", "hello"])
        .args(extra)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected exit 1, got {:?}; stderr: {stderr}",
        out.status
    );
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    stderr
}

fn rewrite_gguf(
    src: &Path,
    dst: &Path,
    edit: impl FnOnce(&mut Vec<(String, MetaValue)>, &mut Vec<TensorToWrite<'static>>),
) {
    let bytes = std::fs::read(src).unwrap();
    let h = gguf::read_header(&bytes, src).unwrap();
    let mut meta = h.metadata.clone();
    let mut tensors: Vec<TensorToWrite<'static>> = h
        .tensor_order
        .iter()
        .map(|n| {
            let t = &h.tensors[n];
            TensorToWrite {
                name: n.clone(),
                dtype: t.dtype,
                dims: t.dims.clone(),
                data: bytes[t.offset..t.offset + t.size].to_vec().into(),
            }
        })
        .collect();
    edit(&mut meta, &mut tensors);
    gguf::write(dst, &meta, &tensors).unwrap();
}

#[test]
fn missing_model_path() {
    let err = fails(Path::new("/nonexistent/model.gguf"), &[]);
    assert!(
        err.contains("/nonexistent/model.gguf") && err.contains("No such file"),
        "{err}"
    );
}

#[test]
fn directory_without_config() {
    let dir = tempfile::tempdir().unwrap();
    let err = fails(dir.path(), &[]);
    assert!(err.contains("no config.json"), "{err}");
}

#[test]
fn truncated_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let src = model().join("model-q8_0.gguf");
    let bytes = std::fs::read(&src).unwrap();
    for cut in [10, 2000, bytes.len() / 2, bytes.len() - 1] {
        let p = dir.path().join("cut.gguf");
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let err = fails(&p, &[]);
        assert!(
            err.contains("cut.gguf") && err.contains("invalid GGUF file"),
            "{cut}: {err}"
        );
    }
}

#[test]
fn not_a_gguf_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("weights.gguf");
    std::fs::write(&p, b"this is not a model, just some text\n").unwrap();
    let err = fails(&p, &[]);
    assert!(
        err.contains("weights.gguf") && err.contains("bad magic"),
        "{err}"
    );
}

#[test]
fn corrupt_gguf_header_values() {
    let dir = tempfile::tempdir().unwrap();
    let src = model().join("model-q8_0.gguf");
    let mut bytes = std::fs::read(&src).unwrap();
    // The metadata count (bytes 16..24) claims more entries than the file can hold.
    bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    let p = dir.path().join("corrupt.gguf");
    std::fs::write(&p, &bytes).unwrap();
    let err = fails(&p, &[]);
    assert!(
        err.contains("corrupt.gguf") && err.contains("metadata count"),
        "{err}"
    );
}

#[test]
fn truncated_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    copy_dir(model(), &m);
    let st = m.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 3]).unwrap();
    let err = fails(&m, &[]);
    assert!(
        err.contains("model.safetensors") && err.contains("invalid safetensors"),
        "{err}"
    );
}

#[test]
fn garbage_safetensors_header() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    copy_dir(model(), &m);
    let mut bytes = 40u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{\"not\": \"a safetensors header\"}        ");
    std::fs::write(m.join("model.safetensors"), &bytes).unwrap();
    let err = fails(&m, &[]);
    assert!(
        err.contains("model.safetensors") && err.contains("invalid safetensors"),
        "{err}"
    );
}

#[test]
fn unknown_architecture_in_config_json() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    copy_dir(model(), &m);
    let cfg = std::fs::read_to_string(m.join("config.json"))
        .unwrap()
        .replace("LlamaForCausalLM", "GPTNeoXForCausalLM");
    std::fs::write(m.join("config.json"), cfg).unwrap();
    let err = fails(&m, &[]);
    assert!(
        err.contains("config.json") && err.contains("unknown architecture `GPTNeoXForCausalLM`"),
        "{err}"
    );
}

#[test]
fn unknown_architecture_in_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("falcon.gguf");
    rewrite_gguf(&model().join("model-q8_0.gguf"), &p, |meta, _| {
        for (k, v) in meta.iter_mut() {
            if k == "general.architecture" {
                *v = MetaValue::String("falcon".into());
            }
        }
    });
    let err = fails(&p, &[]);
    assert!(
        err.contains("falcon.gguf") && err.contains("unknown architecture `falcon`"),
        "{err}"
    );
}

#[test]
fn missing_tensor_in_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("holes.gguf");
    rewrite_gguf(&model().join("model-q8_0.gguf"), &p, |_, tensors| {
        tensors.retain(|t| t.name != "blk.1.ffn_up.weight");
    });
    let err = fails(&p, &[]);
    assert!(
        err.contains("holes.gguf") && err.contains("missing tensor `blk.1.ffn_up.weight`"),
        "{err}"
    );
}

#[test]
fn missing_tensor_in_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    copy_dir(model(), &m);
    let st = m.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    let parsed = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView<'_>)> = parsed
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != "model.layers.1.self_attn.k_proj.weight")
        .collect();
    let out = safetensors::serialize(kept, None).unwrap();
    std::fs::write(&st, out).unwrap();
    let err = fails(&m, &[]);
    assert!(
        err.contains("model.safetensors")
            && err.contains("missing tensor `model.layers.1.self_attn.k_proj.weight`"),
        "{err}"
    );
}

#[test]
fn shape_mismatch_between_config_and_weights() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    copy_dir(model(), &m);
    let cfg = std::fs::read_to_string(m.join("config.json"))
        .unwrap()
        .replace("\"intermediate_size\": 512", "\"intermediate_size\": 768");
    std::fs::write(m.join("config.json"), cfg).unwrap();
    let err = fails(&m, &[]);
    assert!(
        err.contains("model.safetensors")
            && err.contains("has shape [512, 256]")
            && err.contains("[768, 256]"),
        "{err}"
    );
}

#[test]
fn invalid_sampling_setting() {
    let err = fails(model(), &["--top-p", "0"]);
    assert!(err.contains("top_p"), "{err}");
}

#[test]
fn prompt_longer_than_the_context() {
    let err = fails(model(), &["--max-tokens", "100000"]);
    assert!(err.contains("context length is 2048"), "{err}");
}

#[test]
fn layer_range_out_of_bounds() {
    let files = ModelFiles::open(model()).unwrap();
    for (start, end) in [(0, 3), (2, 2), (1, 0)] {
        let err = files
            .load_shard(LayerRange { start, end })
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            format!("layer range {start}..{end} is out of bounds for a model with 2 layers")
        );
    }
}

#[test]
fn clap_rejects_unknown_flags_with_usage() {
    let out = Command::new(env!("CARGO_BIN_EXE_llmesh"))
        .args(["generate", "--bogus"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unexpected argument '--bogus'"));
}

/// `llmesh bench --json` reports its figures, each decode run's bandwidth fraction measured
/// next to it (so the median lies within the range); bad settings are a one-line error.
#[test]
fn bench_reports_its_figures_and_rejects_bad_settings() {
    let gguf = model().join("model-q8_0.gguf");
    let bench = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_llmesh"))
            .args(["bench", "--threads", "1", "--model"])
            .arg(&gguf)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = bench(&[
        "--prompt-tokens",
        "5",
        "--gen-tokens",
        "4",
        "--repeat",
        "2",
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in [
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
        "peak_rss_bytes",
        "memory_bandwidth_bytes_per_s",
        "bandwidth_fraction",
    ] {
        let x = v[key].as_f64().unwrap_or(0.0);
        assert!(x > 0.0 && x.is_finite(), "{key} = {}", v[key]);
    }
    let f = v["bandwidth_fraction"].as_f64().unwrap();
    let range = &v["bandwidth_fraction_range"];
    let (lo, hi) = (range[0].as_f64().unwrap(), range[1].as_f64().unwrap());
    assert!(lo <= f && f <= hi, "{f} outside [{lo}, {hi}]");

    let out = bench(&["--repeat", "0"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        !stderr.contains("panicked") && stderr.contains("--repeat"),
        "{stderr}"
    );
}
