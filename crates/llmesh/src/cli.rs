//! Command-line arguments (clap derive). Values are checked again where they are used, with
//! messages that name the flag.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use llmesh_engine::KvType;

/// Run large language models across the computers you own.
#[derive(Debug, Parser)]
#[command(name = "llmesh", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a node: load a model and serve the OpenAI-compatible API and the chat page.
    Run(Box<RunArgs>),
    /// Complete a prompt (raw text, no chat template) and stream the text to stdout.
    Generate(GenerateArgs),
    /// Chat with a model using its chat template; interactive without --prompt.
    Chat(ChatArgs),
    /// Measure prefill and decode speed, memory and bandwidth use; with --cluster, compare a
    /// pipeline of N local nodes with one node.
    Bench(BenchArgs),
    /// Developer tools.
    #[command(subcommand)]
    Dev(DevCommand),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// A Hugging Face model directory or a .gguf file; without it, a tiny built-in demo model.
    #[arg(long, short = 'm')]
    pub model: Option<PathBuf>,
    /// Address to serve HTTP on (loopback by default; 0.0.0.0 for every interface).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// HTTP port (0 picks a free one and prints it).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every /v1 request.
    #[arg(long, env = "LLMESH_API_KEY")]
    pub api_key: Option<String>,
    /// Requests generated at the same time.
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// Requests that may wait for a free slot before new ones are refused with 503.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// Compute threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// This node's name in the cluster panel (default: the host name).
    #[arg(long)]
    pub node_name: Option<String>,
    /// Where llmesh keeps its state: node identity, cluster key, the demo model, measurements.
    #[arg(long, env = "LLMESH_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Peer-to-peer address to listen on (`host:port` or a multiaddr).
    #[arg(long, default_value = "0.0.0.0:47480")]
    pub listen: Vec<String>,
    /// Another node to connect to, `host:port` or a multiaddr (repeatable; for other subnets,
    /// VPNs, or networks without multicast).
    #[arg(long)]
    pub peer: Vec<String>,
    /// The cluster's shared secret (default: the one saved in the data directory, created on
    /// first run).
    #[arg(long, env = "LLMESH_CLUSTER_KEY", conflicts_with = "cluster_key_file")]
    pub cluster_key: Option<String>,
    /// A file holding the cluster key.
    #[arg(long)]
    pub cluster_key_file: Option<PathBuf>,
    /// Memory this node may use for weights and KV cache (bytes, or with KiB/MiB/GiB/KB/MB/GB;
    /// default: 90% of the memory available at start).
    #[arg(long)]
    pub memory_limit: Option<String>,
    /// Do not look for peers with mDNS (only --peer addresses).
    #[arg(long)]
    pub no_discovery: bool,
    /// How to split the model: latency (fastest time per token) or memory-weighted.
    #[arg(long, default_value = "latency")]
    pub partitioner: String,
    /// Activations between nodes as f32, f16 or bf16 (default: f32 for f32 models, else f16).
    #[arg(long)]
    pub wire_dtype: Option<String>,
    /// Tokens of KV cache each node reserves memory for.
    #[arg(long, default_value_t = 4096)]
    pub kv_cache_tokens: usize,
    /// How the KV cache stores keys and values: f32, or f16 (half the memory, as llama.cpp; a
    /// request replayed after a lost node may then continue differently).
    #[arg(long, default_value_t = KvType::default())]
    pub kv_cache_type: KvType,
    /// Estimated seconds a hop between nodes adds per token (for the latency partitioner).
    #[arg(long, default_value_t = 0.002)]
    pub hop_cost: f64,
    /// Seconds the set of nodes must stay unchanged before re-planning.
    #[arg(long, default_value_t = 1.0)]
    pub settle: f64,
    /// Use this speed (seconds per layer per token) instead of measuring it (for simulations).
    #[arg(long, hide = true)]
    pub speed: Option<f64>,
}

#[derive(Debug, Args)]
pub struct ModelArgs {
    /// A Hugging Face model directory (config.json, tokenizer.json, *.safetensors) or a .gguf file.
    #[arg(long, short = 'm')]
    pub model: PathBuf,
    /// Compute threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// How the KV cache stores keys and values: f32, or f16 (half the memory, as llama.cpp; a
    /// request replayed after a lost node may then continue differently).
    #[arg(long, default_value_t = KvType::default())]
    pub kv_cache_type: KvType,
}

#[derive(Debug, Args)]
pub struct SamplingArgs {
    /// Most tokens to generate.
    #[arg(long, short = 'n', default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(
        long,
        short = 't',
        default_value_t = 0.8,
        allow_negative_numbers = true
    )]
    pub temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this total probability.
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Keep only the K most likely tokens (0: off).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Drop tokens less likely than this fraction of the most likely one (0: off).
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    /// Penalise tokens already in the context (1: off).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Penalise tokens already generated, once (OpenAI's presence_penalty).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub presence_penalty: f32,
    /// Penalise tokens already generated, per occurrence (OpenAI's frequency_penalty).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub frequency_penalty: f32,
    /// Random seed: the same seed and settings give the same text.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when this text appears (repeatable); the text is not printed.
    #[arg(long)]
    pub stop: Vec<String>,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The text to complete.
    #[arg(long, short = 'p')]
    pub prompt: String,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print one JSON object (text, token ids, counts, speeds) instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// With --json: include each generated token's log-probability and the N most likely tokens.
    #[arg(long)]
    pub logprobs: Option<usize>,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// A model directory or .gguf file (default: a synthetic Llama of about 180M parameters in
    /// Q8_0, made once in the data directory).
    #[arg(long, short = 'm')]
    pub model: Option<PathBuf>,
    /// Prompt length.
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    /// Tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub gen_tokens: usize,
    /// Compute threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Repetitions (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// How the KV cache stores keys and values: f32, or f16 (half the memory, as llama.cpp; a
    /// request replayed after a lost node may then continue differently).
    #[arg(long, default_value_t = KvType::default())]
    pub kv_cache_type: KvType,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Compare a pipeline of this many local nodes (processes on loopback) with one node.
    #[arg(long)]
    pub cluster: Option<usize>,
    /// Where to keep the synthetic bench model.
    #[arg(long, env = "LLMESH_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// One message to answer; without it, chat interactively on the terminal.
    #[arg(long, short = 'p')]
    pub prompt: Option<String>,
    /// A system message.
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

#[derive(Debug, Subcommand)]
pub enum DevCommand {
    /// Write a tiny random model (Hugging Face layout and GGUF) with a trained tokenizer.
    MakeModel(Box<MakeModelArgs>),
    /// Print the token ids of a text as a JSON array.
    Tokenize(TokenizeArgs),
    /// Load a range of a model's layers and report the memory it took, as JSON.
    Load(LoadArgs),
    /// Measure this machine's memory read bandwidth (bytes per second, best of six passes
    /// over 1 GiB, each thread reading one stream or eight); `llmesh bench` runs it next to
    /// each decode run.
    Bandwidth(BandwidthArgs),
}

#[derive(Debug, Args)]
pub struct BandwidthArgs {
    /// Threads reading (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

#[derive(Debug, Args)]
pub struct LoadArgs {
    /// A Hugging Face model directory or a .gguf file.
    #[arg(long, short = 'm')]
    pub model: PathBuf,
    /// Layers to load, `START..END` (default: all).
    #[arg(long)]
    pub layers: Option<String>,
}

#[derive(Debug, Args)]
pub struct TokenizeArgs {
    /// A Hugging Face model directory or a .gguf file.
    #[arg(long, short = 'm')]
    pub model: PathBuf,
    /// The text; `-` reads standard input.
    #[arg(long)]
    pub text: String,
    /// Add the BOS token as the tokenizer's configuration says.
    #[arg(long)]
    pub add_special: bool,
}

#[derive(Debug, Args)]
pub struct MakeModelArgs {
    /// Architecture: llama, mistral, qwen2 or qwen3.
    #[arg(long)]
    pub arch: String,
    /// Output directory (created).
    #[arg(long)]
    pub out: PathBuf,
    /// Transformer blocks.
    #[arg(long)]
    pub layers: Option<usize>,
    /// Residual width.
    #[arg(long)]
    pub hidden: Option<usize>,
    /// Query heads.
    #[arg(long)]
    pub heads: Option<usize>,
    /// Key/value heads.
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// Head size (default: hidden / heads, or 128 for qwen3).
    #[arg(long)]
    pub head_dim: Option<usize>,
    /// MLP width.
    #[arg(long)]
    pub intermediate: Option<usize>,
    /// Approximate vocabulary size.
    #[arg(long)]
    pub vocab: Option<usize>,
    /// Context length.
    #[arg(long)]
    pub context: Option<usize>,
    /// Tokenizer family: llama3, qwen, qwen3, llama2 or mistral (default: the architecture's).
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// Share the embedding with the output head.
    #[arg(long)]
    pub tie_embeddings: Option<bool>,
    /// Random seed of the weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Element type of the safetensors weights: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Split the safetensors weights into this many files with an index.
    #[arg(long, default_value_t = 1)]
    pub shards: usize,
    /// GGUF files to write as well (comma-separated): f32, f16, bf16, q8_0, q4_0, q4_1, q5_0,
    /// q5_1, q2_k, q3_k, q4_k, q5_k, q6_k, q4_k_m, q5_k_m.
    #[arg(long, value_delimiter = ',')]
    pub gguf: Vec<String>,
}
