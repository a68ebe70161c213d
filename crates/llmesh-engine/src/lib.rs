//! The llmesh model engine.
//!
//! It reads the files people download (Hugging Face safetensors directories and GGUF files) and
//! runs any contiguous range of a model's layers — a [`Shard`] — so that a cluster can split one
//! model between devices. One implementation covers Llama, Mistral, Qwen2 and Qwen3; the
//! architecture only changes configuration (biases, per-head norms, rotary scaling). Weights are
//! asked for by role ([`WeightName`]) and read only for the layers loaded; quantized GGUF weights
//! stay quantized in memory.
//!
//! Around the layers: tokenizers (from `tokenizer.json` or rebuilt from GGUF metadata), chat
//! templates (minijinja, transformers-compatible), sampling, and the generation loop, which runs
//! over any [`StepRunner`] so the same loop drives a local model or a pipeline across nodes.
//!
//! The engine knows nothing about networks or HTTP.

#![deny(missing_docs)]

pub mod chat_template;
pub mod config;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod gguf_export;
pub mod gguf_source;
pub mod head;
pub mod kv_cache;
pub mod model;
pub mod model_files;
pub mod safetensors_source;
pub mod sampling;
pub mod service;
pub mod synth;
pub mod system;
pub mod threads;
pub mod tokenizer;
pub mod weights;

pub use chat_template::{ChatTemplate, Message};
pub use config::{Architecture, ModelConfig};
pub use error::{Error, Result};
pub use generate::{
    FinishReason, GenerateRequest, Generation, LocalRunner, StepRunner, TokenEvent, generate,
};
pub use kv_cache::{KvCache, KvType};
pub use model::{LayerRange, LogitsFor, Shard, ShardInput, ShardOutput};
pub use model_files::{ModelFiles, ModelFormat};
pub use sampling::SamplingParams;
pub use tokenizer::Tokenizer;
pub use weights::{Weight, WeightName, WeightSource};
