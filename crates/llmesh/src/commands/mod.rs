//! One module per command.

mod bench;
mod chat;
mod generate;
mod make_model;
mod run;

use anyhow::{Context, Result};
use llmesh_engine::{LayerRange, ModelFiles, SamplingParams, Shard};

use crate::cli::{Cli, Command, DevCommand, LoadArgs, ModelArgs, SamplingArgs, TokenizeArgs};

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(args) => run::run(*args),
        Command::Generate(args) => generate::run(args),
        Command::Chat(args) => chat::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Dev(DevCommand::MakeModel(args)) => make_model::run(*args),
        Command::Dev(DevCommand::Tokenize(args)) => tokenize(args),
        Command::Dev(DevCommand::Load(args)) => load(args),
        Command::Dev(DevCommand::Bandwidth(args)) => bench::bandwidth(args),
    }
}

/// Sets the thread count, opens the model and loads all its layers.
fn load_model(args: &ModelArgs) -> Result<(ModelFiles, Shard)> {
    llmesh_engine::threads::set_compute_threads(args.threads)?;
    let files = ModelFiles::open(&args.model)?.with_kv_type(args.kv_cache_type);
    let shard = files
        .load_full()
        .with_context(|| format!("loading {}", args.model.display()))?;
    tracing::info!(
        model = %args.model.display(),
        layers = files.config().num_layers,
        weight_mib = shard.weight_bytes() / (1 << 20),
        "model loaded"
    );
    Ok((files, shard))
}

fn sampling(args: &SamplingArgs) -> Result<SamplingParams> {
    let p = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        repetition_penalty: args.repetition_penalty,
        presence_penalty: args.presence_penalty,
        frequency_penalty: args.frequency_penalty,
        seed: args.seed,
    };
    p.validate()?;
    Ok(p)
}

fn tokenize(args: TokenizeArgs) -> Result<()> {
    let text = if args.text == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading standard input")?
    } else {
        args.text
    };
    let files = ModelFiles::open(&args.model)?;
    let ids = files.tokenizer().encode(&text, args.add_special)?;
    println!("{}", serde_json::to_string(&ids)?);
    Ok(())
}

fn load(args: LoadArgs) -> Result<()> {
    let files = ModelFiles::open(&args.model)?;
    let layers = files.config().num_layers;
    let range = match &args.layers {
        None => LayerRange::full(layers),
        Some(text) => {
            let (a, b) = text
                .split_once("..")
                .and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?)))
                .ok_or_else(|| {
                    anyhow::anyhow!("--layers `{text}` is not of the form START..END")
                })?;
            LayerRange::new(a, b, layers)?
        }
    };
    let shard = files.load_shard(range)?;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|v| v * 1024)
    };
    let v = serde_json::json!({
        "layers": range.to_string(),
        "model_layers": layers,
        "weight_bytes": shard.weight_bytes(),
        "rss_bytes": kib("VmRSS:"),
        "peak_rss_bytes": kib("VmHWM:"),
    });
    println!("{v}");
    Ok(())
}
