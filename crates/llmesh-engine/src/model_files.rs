//! Opening a model as users download it: a Hugging Face directory or a GGUF file. Reads the
//! configuration, tokenizer, chat template and end-of-sequence ids, and loads shards on demand.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use crate::chat_template::ChatTemplate;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::gguf::MetaValue;
use crate::gguf_source::GgufSource;
use crate::kv_cache::KvType;
use crate::model::{LayerRange, Shard};
use crate::safetensors_source::SafetensorsSource;
use crate::tokenizer::Tokenizer;

/// The file format of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFormat {
    /// A Hugging Face directory with `config.json` and safetensors.
    HuggingFace,
    /// A GGUF file.
    Gguf,
}

/// A model's files, opened and described, with no weights loaded yet.
#[derive(Debug)]
pub struct ModelFiles {
    path: PathBuf,
    format: ModelFormat,
    config: Arc<ModelConfig>,
    tokenizer: Tokenizer,
    chat_template: Option<String>,
    eos_ids: Vec<u32>,
    f32_weights: bool,
    kv_type: KvType,
}

impl ModelFiles {
    /// Opens a model directory or GGUF file.
    pub fn open(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if meta.is_dir() {
            Self::open_hf(path)
        } else {
            Self::open_gguf(path)
        }
    }

    fn open_hf(dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(Error::format(
                dir,
                "not a model directory: no config.json (give a Hugging Face model directory or a .gguf file)",
            ));
        }
        let config = ModelConfig::from_hf_file(&config_path)?;
        let read_json = |name: &str| -> Result<Option<Value>> {
            let p = dir.join(name);
            if !p.is_file() {
                return Ok(None);
            }
            let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
            serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| Error::format(&p, format!("invalid JSON: {e}")))
        };
        let tok_config = read_json("tokenizer_config.json")?;
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            return Err(Error::format(
                dir,
                "no tokenizer.json in the model directory",
            ));
        }
        let tokenizer = Tokenizer::from_hf_files(&tok_path, tok_config.as_ref())?;
        let chat_template = match std::fs::read_to_string(dir.join("chat_template.jinja")) {
            Ok(t) => Some(t),
            Err(_) => tok_config
                .as_ref()
                .and_then(|c| template_from_config(c.get("chat_template"))),
        };
        let mut eos_ids = config.eos_token_ids.clone();
        if let Some(generation) = read_json("generation_config.json")? {
            match generation.get("eos_token_id") {
                Some(Value::Number(n)) => eos_ids.extend(n.as_u64().map(|v| v as u32)),
                Some(Value::Array(a)) => {
                    eos_ids.extend(a.iter().filter_map(|v| v.as_u64().map(|v| v as u32)))
                }
                _ => {}
            }
        }
        eos_ids.extend_from_slice(tokenizer.eos_ids());
        let f32_weights = std::fs::read_to_string(&config_path)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .and_then(|v| {
                v.get("torch_dtype")
                    .or_else(|| v.get("dtype"))
                    .and_then(Value::as_str)
                    .map(|d| d == "float32")
            })
            .unwrap_or(false);
        Ok(ModelFiles {
            f32_weights,
            path: dir.to_path_buf(),
            format: ModelFormat::HuggingFace,
            config: Arc::new(config),
            tokenizer,
            chat_template,
            eos_ids: dedup(eos_ids),
            kv_type: KvType::default(),
        })
    }

    fn open_gguf(path: &Path) -> Result<Self> {
        let mut source = GgufSource::open(path)?;
        let config = source.config()?;
        let tokenizer = Tokenizer::from_gguf(source.header(), path)?;
        let chat_template = source
            .header()
            .get("tokenizer.chat_template")
            .and_then(MetaValue::as_str)
            .map(str::to_string);
        let mut eos_ids = config.eos_token_ids.clone();
        eos_ids.extend_from_slice(tokenizer.eos_ids());
        let f32_weights = source
            .header()
            .tensors
            .get(&crate::weights::WeightName::Layer(0, crate::weights::LayerWeight::Q).gguf())
            .is_some_and(|t| t.dtype == candle_core::quantized::GgmlDType::F32);
        Ok(ModelFiles {
            f32_weights,
            path: path.to_path_buf(),
            format: ModelFormat::Gguf,
            config: Arc::new(config),
            tokenizer,
            chat_template,
            eos_ids: dedup(eos_ids),
            kv_type: KvType::default(),
        })
    }

    /// Where the model is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the weights are stored as 32-bit floats (activations between nodes then travel
    /// as f32 too, so a split model computes exactly what the whole one does).
    pub fn f32_weights(&self) -> bool {
        self.f32_weights
    }

    /// Its file format.
    pub fn format(&self) -> ModelFormat {
        self.format
    }

    /// A short name: the directory or file name without `.gguf`.
    pub fn name(&self) -> String {
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        name.strip_suffix(".gguf")
            .map(str::to_string)
            .unwrap_or(name)
    }

    /// The model's configuration.
    pub fn config(&self) -> &Arc<ModelConfig> {
        &self.config
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Ids that end generation: from config.json, generation_config.json, the tokenizer files,
    /// or the GGUF metadata (EOS, end of turn, end of message).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The chat template's source, if the model has one.
    pub fn chat_template_source(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The compiled chat template; an error if the model has none or it does not compile.
    pub fn chat_template(&self) -> Result<ChatTemplate> {
        let src = self.chat_template.as_deref().ok_or_else(|| {
            Error::format(
                &self.path,
                "the model has no chat template; use a raw completion instead",
            )
        })?;
        ChatTemplate::new(src, self.tokenizer.bos_token(), self.tokenizer.eos_token())
    }

    /// The files, with the shards loaded from them storing their KV caches as `kv`.
    pub fn with_kv_type(mut self, kv: KvType) -> Self {
        self.kv_type = kv;
        self
    }

    /// How the shards loaded from these files store their KV caches.
    pub fn kv_type(&self) -> KvType {
        self.kv_type
    }

    /// Loads the layers in `range` (see [`Shard::load`]).
    pub fn load_shard(&self, range: LayerRange) -> Result<Shard> {
        LayerRange::new(range.start, range.end, self.config.num_layers)?;
        let shard = match self.format {
            ModelFormat::HuggingFace => {
                let src = SafetensorsSource::open(&self.path)?;
                Shard::load(&src, self.config.clone(), range)?
            }
            ModelFormat::Gguf => {
                let mut src = GgufSource::open(&self.path)?;
                src.config()?;
                Shard::load(&src, self.config.clone(), range)?
            }
        };
        Ok(shard.with_kv_type(self.kv_type))
    }

    /// Loads every layer.
    pub fn load_full(&self) -> Result<Shard> {
        self.load_shard(LayerRange::full(self.config.num_layers))
    }
}

fn dedup(mut ids: Vec<u32>) -> Vec<u32> {
    let mut seen = std::collections::HashSet::new();
    ids.retain(|id| seen.insert(*id));
    ids
}

/// `chat_template` in tokenizer_config.json is a string, or a list of named templates.
fn template_from_config(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Array(list) => {
            let named = |name: &str| {
                list.iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some(name))
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
            };
            named("default")
                .or_else(|| {
                    list.first()
                        .and_then(|t| t.get("template"))
                        .and_then(Value::as_str)
                })
                .map(str::to_string)
        }
        _ => None,
    }
}
