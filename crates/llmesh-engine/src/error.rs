//! The engine's error type. Every variant renders as one line that names the file, tensor or
//! setting at fault, so the CLI can print it as is.

use std::path::{Path, PathBuf};

/// Errors from loading and running models.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened or read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// A file is truncated, corrupt, or not in the format it claims to be.
    #[error("{}: {msg}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// A tensor the model needs is not in its files.
    #[error("{}: missing tensor `{name}`", path.display())]
    MissingTensor {
        /// The file (or directory) searched.
        path: PathBuf,
        /// The tensor's name in that file's naming scheme.
        name: String,
    },
    /// A tensor has a shape that does not match the model's configuration.
    #[error("{}: tensor `{name}` has shape {got:?}, the model's configuration needs {expected:?}", path.display())]
    Shape {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        name: String,
        /// Its shape in the file.
        got: Vec<usize>,
        /// The shape the configuration implies.
        expected: Vec<usize>,
    },
    /// The model's architecture is not one llmesh runs.
    #[error("{}: unknown architecture `{arch}` (llmesh runs llama, mistral, qwen2 and qwen3)", path.display())]
    UnknownArchitecture {
        /// The file that names the architecture.
        path: PathBuf,
        /// The name found there.
        arch: String,
    },
    /// A configuration value is missing or invalid.
    #[error("{}: {msg}", path.display())]
    Config {
        /// The file holding the configuration.
        path: PathBuf,
        /// What is missing or wrong.
        msg: String,
    },
    /// A layer range does not fit the model.
    #[error("layer range {start}..{end} is out of bounds for a model with {layers} layers")]
    LayerRange {
        /// First layer asked for.
        start: usize,
        /// One past the last layer asked for.
        end: usize,
        /// Number of layers in the model.
        layers: usize,
    },
    /// A request does not fit in the model's context window.
    #[error(
        "this request needs {needed} positions ({prompt} prompt tokens + {max_tokens} to generate) but the model's context length is {context}"
    )]
    ContextLength {
        /// Prompt tokens.
        prompt: usize,
        /// Tokens asked for.
        max_tokens: usize,
        /// Prompt + tokens asked for.
        needed: usize,
        /// The model's context length.
        context: usize,
    },
    /// Tokenizer construction or use failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template could not be parsed or rendered.
    #[error("chat template: {0}")]
    Template(String),
    /// A caller passed an invalid argument (sampling settings, input shapes, ...).
    #[error("{0}")]
    Invalid(String),
    /// The model cannot run now (a cluster lost too many nodes, or is still loading).
    #[error("{0}")]
    Unavailable(String),
    /// A tensor operation failed.
    #[error("tensor computation failed: {0}")]
    Compute(#[from] candle_core::Error),
}

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn format(path: &Path, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }

    pub(crate) fn config(path: &Path, msg: impl Into<String>) -> Self {
        Error::Config {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }
}

/// The engine's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
