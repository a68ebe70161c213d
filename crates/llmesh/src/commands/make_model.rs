//! `llmesh dev make-model`: a tiny random model in the real formats, for tests and benchmarks.

use anyhow::{Result, bail};
use llmesh_engine::Architecture;
use llmesh_engine::gguf_export::FileType;
use llmesh_engine::synth::{StDtype, SynthSpec, TokenizerStyle, make_model};

use crate::cli::MakeModelArgs;

pub fn run(args: MakeModelArgs) -> Result<()> {
    let Some(arch) = Architecture::from_name(&args.arch) else {
        bail!(
            "--arch `{}` is not one of llama, mistral, qwen2, qwen3",
            args.arch
        );
    };
    let mut spec = SynthSpec::new(arch);
    if let Some(v) = args.layers {
        spec.layers = v;
    }
    if let Some(v) = args.hidden {
        spec.hidden = v;
    }
    if let Some(v) = args.heads {
        spec.heads = v;
    }
    if let Some(v) = args.kv_heads {
        spec.kv_heads = v;
    }
    spec.head_dim = match args.head_dim {
        Some(d) => d,
        None if arch == Architecture::Qwen3 => spec.head_dim,
        None if spec.heads > 0 => spec.hidden / spec.heads,
        None => 0,
    };
    if let Some(v) = args.intermediate {
        spec.intermediate = v;
    }
    if let Some(v) = args.vocab {
        spec.vocab = v;
    }
    if let Some(v) = args.context {
        spec.context = v;
    }
    if let Some(v) = args.tie_embeddings {
        spec.tie_embeddings = v;
    }
    if let Some(t) = &args.tokenizer {
        spec.tokenizer = match t.as_str() {
            "llama3" => TokenizerStyle::Llama3,
            "qwen" => TokenizerStyle::Qwen,
            "qwen3" => TokenizerStyle::Qwen3,
            "llama2" => TokenizerStyle::Llama2,
            "mistral" => TokenizerStyle::Mistral,
            other => {
                bail!("--tokenizer `{other}` is not one of llama3, qwen, qwen3, llama2, mistral")
            }
        };
    }
    spec.seed = args.seed;
    spec.dtype = StDtype::from_name(&args.dtype)
        .ok_or_else(|| anyhow::anyhow!("--dtype `{}` is not one of f32, f16, bf16", args.dtype))?;
    spec.shards = args.shards;
    for g in &args.gguf {
        match FileType::from_name(g) {
            Some(t) => spec.gguf.push(t),
            None => bail!(
                "--gguf `{g}` is not one of {}",
                FileType::ALL
                    .iter()
                    .map(|t| t.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
    let model = make_model(&spec, &args.out)?;
    let c = &model.config;
    println!(
        "wrote {} ({} layers, hidden {}, {} heads / {} kv heads of {}, vocab {})",
        model.dir.display(),
        c.num_layers,
        c.hidden_size,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        c.vocab_size
    );
    for (t, path) in &model.gguf {
        println!("wrote {} ({t})", path.display());
    }
    Ok(())
}
