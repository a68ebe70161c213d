//! One module per command.

mod chat;
mod generate;
mod make_model;

use anyhow::{Context, Result};
use llmesh_engine::{ModelFiles, SamplingParams, Shard};

use crate::cli::{Cli, Command, DevCommand, ModelArgs, SamplingArgs, TokenizeArgs};

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Chat(args) => chat::run(args),
        Command::Dev(DevCommand::MakeModel(args)) => make_model::run(*args),
        Command::Dev(DevCommand::Tokenize(args)) => tokenize(args),
    }
}

/// Sets the thread count, opens the model and loads all its layers.
fn load_model(args: &ModelArgs) -> Result<(ModelFiles, Shard)> {
    llmesh_engine::threads::set_compute_threads(args.threads)?;
    let files = ModelFiles::open(&args.model)?;
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
