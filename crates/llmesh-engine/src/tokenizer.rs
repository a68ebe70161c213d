//! Tokenizers: a Hugging Face `tokenizer.json` through the `tokenizers` crate, or one rebuilt from
//! GGUF metadata (`tokenizer.ggml.*`) in the same form transformers' converters produce, so both
//! files of one model give the same ids.

use std::path::Path;
use std::str::FromStr;

use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::gguf::{Header, MetaValue};

/// The pre-tokenizer regex of Llama 3's `tokenizer.json`.
pub const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The pre-tokenizer regex of Qwen2's `tokenizer.json`.
pub const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Control tokens that end a turn in the common chat formats.
const END_TOKENS: &[&str] = &[
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "</s>",
];

/// GGUF token types (llama.cpp's `llama_token_type`).
pub mod token_type {
    /// An ordinary token.
    pub const NORMAL: i32 = 1;
    /// The unknown token.
    pub const UNKNOWN: i32 = 2;
    /// A control (special) token.
    pub const CONTROL: i32 = 3;
    /// A token added by the user, matched in text.
    pub const USER_DEFINED: i32 = 4;
    /// An unused slot.
    pub const UNUSED: i32 = 5;
    /// A byte-fallback token `<0xXX>`.
    pub const BYTE: i32 = 6;
}

/// A tokenizer with the special-token facts generation needs.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pieces: PieceEncoding,
    bos_token: Option<String>,
    eos_token: Option<String>,
    eos_ids: Vec<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json`, with `tokenizer_config.json` (if given) for the BOS/EOS tokens and
    /// `add_bos_token`.
    pub fn from_hf_files(tokenizer_json: &Path, tokenizer_config: Option<&Value>) -> Result<Self> {
        let text =
            std::fs::read_to_string(tokenizer_json).map_err(|e| Error::io(tokenizer_json, e))?;
        let mut json: Value = serde_json::from_str(&text)
            .map_err(|e| Error::format(tokenizer_json, format!("invalid JSON: {e}")))?;
        let bos_token = tokenizer_config.and_then(|c| token_string(c.get("bos_token")));
        let eos_token = tokenizer_config.and_then(|c| token_string(c.get("eos_token")));
        // transformers honours `add_bos_token` in tokenizer_config.json over the post-processor.
        if let Some(add_bos) = tokenizer_config
            .and_then(|c| c.get("add_bos_token"))
            .and_then(Value::as_bool)
            && let Some(bos) = &bos_token
        {
            set_bos_post_processor(&mut json, add_bos.then_some(bos.as_str()));
        }
        let inner = tokenizers::Tokenizer::from_str(&json.to_string())
            .map_err(|e| Error::format(tokenizer_json, format!("invalid tokenizer: {e}")))?;
        let mut tok = Tokenizer {
            pieces: PieceEncoding::of(&inner),
            inner,
            bos_token,
            eos_token,
            eos_ids: Vec::new(),
        };
        if let Some(id) = tok.eos_token.as_deref().and_then(|t| tok.token_id(t)) {
            tok.eos_ids.push(id);
        }
        Ok(tok)
    }

    /// Rebuilds the tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(header: &Header, path: &Path) -> Result<Self> {
        let spec = GgufVocab::read(header)
            .map_err(|msg| Error::format(path, format!("tokenizer metadata: {msg}")))?;
        let json = spec
            .to_tokenizer_json()
            .map_err(|msg| Error::format(path, format!("tokenizer metadata: {msg}")))?;
        let inner = tokenizers::Tokenizer::from_str(&json.to_string())
            .map_err(|e| Error::format(path, format!("tokenizer metadata: {e}")))?;
        let name = |id: Option<u32>| id.and_then(|i| spec.tokens.get(i as usize).cloned());
        let mut eos_ids: Vec<u32> = [spec.eos_id, spec.eot_id, spec.eom_id]
            .into_iter()
            .flatten()
            .collect();
        // Like llama.cpp, also end on well-known end-of-turn control tokens the metadata does not
        // name (many converted files record only one EOS id).
        for (id, (text, ty)) in spec.tokens.iter().zip(&spec.types).enumerate() {
            if *ty == token_type::CONTROL
                && END_TOKENS.contains(&text.as_str())
                && !eos_ids.contains(&(id as u32))
            {
                eos_ids.push(id as u32);
            }
        }
        Ok(Tokenizer {
            pieces: PieceEncoding::of(&inner),
            inner,
            bos_token: name(spec.bos_id),
            eos_token: name(spec.eos_id),
            eos_ids,
        })
    }

    /// Encodes text. With `add_special_tokens`, the BOS token is added as the tokenizer's
    /// configuration says (as transformers does for a raw prompt); chat templates write their
    /// own BOS and are encoded without.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids to text.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// An incremental decoder for tokens generated after `context` (the prompt), yielding text
    /// as soon as it is complete UTF-8.
    pub fn detokenizer(&self, context: &[u32], skip_special_tokens: bool) -> Detokenizer<'_> {
        Detokenizer::new(self, context, skip_special_tokens)
    }

    /// The id of a token's text, if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The text of a token id as stored in the vocabulary.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The raw bytes a token stands for (a byte-level or byte-fallback token may be part of a
    /// UTF-8 character, so its text alone cannot say).
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(piece) = self.inner.id_to_token(id) else {
            return Vec::new();
        };
        let added = self.inner.get_added_vocabulary().is_special_token(&piece)
            || self.inner.get_added_tokens_decoder().get(&id).is_some();
        if added {
            return piece.into_bytes();
        }
        match self.pieces {
            PieceEncoding::ByteLevel => piece.chars().filter_map(byte_level_byte).collect(),
            PieceEncoding::SentencePiece => match parse_byte_token(&piece) {
                Some(b) => vec![b],
                None => piece.replace('\u{2581}', " ").into_bytes(),
            },
            PieceEncoding::Plain => self.decode(&[id], false).unwrap_or_default().into_bytes(),
        }
    }

    /// Number of ids, including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The BOS token text (for chat templates).
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// The EOS token text (for chat templates).
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Token ids that end generation according to the tokenizer files.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// How vocabulary pieces encode bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PieceEncoding {
    /// GPT-2's byte-to-character table.
    ByteLevel,
    /// `▁` for spaces and `<0xXX>` byte-fallback pieces.
    SentencePiece,
    /// Pieces are plain text.
    Plain,
}

impl PieceEncoding {
    fn of(t: &tokenizers::Tokenizer) -> Self {
        match t.get_decoder() {
            Some(tokenizers::DecoderWrapper::ByteLevel(_)) => PieceEncoding::ByteLevel,
            _ if t.token_to_id("<0x41>").is_some() => PieceEncoding::SentencePiece,
            _ => PieceEncoding::Plain,
        }
    }
}

/// The byte GPT-2's byte-level alphabet maps to `c`: printable bytes stand for themselves, the
/// others were shifted to U+0100 and up in order.
fn byte_level_byte(c: char) -> Option<u8> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let cp = c as u32;
    if cp < 256 && printable(cp) {
        return Some(cp as u8);
    }
    let n = cp.checked_sub(256)?;
    (0u32..256)
        .filter(|b| !printable(*b))
        .nth(n as usize)
        .map(|b| b as u8)
}

fn parse_byte_token(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// Incremental decoding; see [`Tokenizer::detokenizer`].
///
/// Decoding tokens one by one is wrong for many vocabularies: SentencePiece drops the leading
/// space of the first token decoded, and byte-level or byte-fallback tokens may end inside a
/// UTF-8 character. So each step decodes a short window of preceding tokens with and without the
/// new ones and emits the difference, holding text back while it ends in an incomplete
/// character.
pub struct Detokenizer<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
    skip_special: bool,
}

/// Prompt tokens kept as context for the first generated tokens.
const DETOKENIZER_CONTEXT: usize = 6;

impl<'a> Detokenizer<'a> {
    fn new(tokenizer: &'a Tokenizer, context: &[u32], skip_special: bool) -> Self {
        let ids = context[context.len().saturating_sub(DETOKENIZER_CONTEXT)..].to_vec();
        let n = ids.len();
        Detokenizer {
            tokenizer,
            ids,
            prefix: 0,
            read: n,
            skip_special,
        }
    }

    /// Feeds one id; returns the text that became complete (possibly empty).
    pub fn step(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let before = self
            .tokenizer
            .decode(&self.ids[self.prefix..self.read], self.skip_special)?;
        let after = self
            .tokenizer
            .decode(&self.ids[self.prefix..], self.skip_special)?;
        if after.len() <= before.len() || after.ends_with('\u{FFFD}') || !after.starts_with(&before)
        {
            if !after.starts_with(&before) && !after.ends_with('\u{FFFD}') {
                // The window re-segmented earlier text (rare); emit what follows the common part.
                let common = before
                    .char_indices()
                    .zip(after.chars())
                    .take_while(|((_, a), b)| a == b)
                    .count();
                let at = after
                    .char_indices()
                    .nth(common)
                    .map_or(after.len(), |(i, _)| i);
                let out = after[at..].to_string();
                self.advance();
                return Ok(out);
            }
            return Ok(String::new());
        }
        let out = after[before.len()..].to_string();
        self.advance();
        Ok(out)
    }

    fn advance(&mut self) {
        self.prefix = self.read;
        self.read = self.ids.len();
    }

    /// Text held back at the end (an incomplete character decodes as U+FFFD).
    pub fn flush(&mut self) -> Result<String> {
        let before = self
            .tokenizer
            .decode(&self.ids[self.prefix..self.read], self.skip_special)?;
        let after = self
            .tokenizer
            .decode(&self.ids[self.prefix..], self.skip_special)?;
        self.advance();
        Ok(after
            .strip_prefix(before.as_str())
            .unwrap_or_default()
            .to_string())
    }
}

/// Replaces the BOS part of a tokenizer.json post-processor: `Some(bos)` adds it, `None` removes it.
fn set_bos_post_processor(json: &mut Value, bos: Option<&str>) {
    let Some(obj) = json.as_object_mut() else {
        return;
    };
    let id = obj
        .get("added_tokens")
        .and_then(Value::as_array)
        .and_then(|a| {
            a.iter()
                .find(|t| t.get("content").and_then(Value::as_str) == bos)
                .and_then(|t| t.get("id"))
                .cloned()
        });
    let template = match (bos, id) {
        (Some(bos), Some(id)) => Some(bos_template(bos, &id)),
        _ => None,
    };
    let keep_byte_level = obj
        .get("post_processor")
        .map(|p| p.to_string().contains("\"ByteLevel\""))
        .unwrap_or(false);
    let mut parts = Vec::new();
    if keep_byte_level {
        parts.push(json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true}));
    }
    parts.extend(template);
    let pp = match parts.len() {
        0 => Value::Null,
        1 => parts.pop().unwrap_or(Value::Null),
        _ => json!({"type": "Sequence", "processors": parts}),
    };
    obj.insert("post_processor".into(), pp);
}

fn bos_template(bos: &str, id: &Value) -> Value {
    json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [id], "tokens": [bos]}},
    })
}

/// The tokenizer facts a GGUF file carries.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`: `gpt2` (byte-level BPE) or `llama` (SentencePiece).
    pub model: String,
    /// `tokenizer.ggml.pre`: which pre-tokenizer regex a BPE vocabulary uses.
    pub pre: Option<String>,
    /// Token texts by id.
    pub tokens: Vec<String>,
    /// Token types by id (see [`token_type`]).
    pub types: Vec<i32>,
    /// Token scores (SentencePiece).
    pub scores: Vec<f32>,
    /// BPE merges, `"a b"`.
    pub merges: Vec<String>,
    /// Special ids.
    pub bos_id: Option<u32>,
    /// End of sequence.
    pub eos_id: Option<u32>,
    /// End of turn.
    pub eot_id: Option<u32>,
    /// End of message.
    pub eom_id: Option<u32>,
    /// Unknown token.
    pub unk_id: Option<u32>,
    /// Padding token.
    pub pad_id: Option<u32>,
    /// Whether a raw prompt starts with BOS.
    pub add_bos: bool,
    /// Whether SentencePiece text gets a leading space.
    pub add_space_prefix: bool,
}

impl GgufVocab {
    fn read(h: &Header) -> std::result::Result<Self, String> {
        let model = h
            .get("tokenizer.ggml.model")
            .and_then(MetaValue::as_str)
            .ok_or("missing `tokenizer.ggml.model`")?
            .to_string();
        let strings = |key: &str| -> std::result::Result<Vec<String>, String> {
            match h.get(key) {
                None => Ok(Vec::new()),
                Some(v) => v
                    .as_array()
                    .ok_or(format!("`{key}` is not an array"))?
                    .iter()
                    .map(|x| {
                        x.as_str()
                            .map(str::to_string)
                            .ok_or(format!("`{key}` holds a non-string"))
                    })
                    .collect(),
            }
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        if tokens.is_empty() {
            return Err("missing `tokenizer.ggml.tokens`".into());
        }
        let types = match h.get("tokenizer.ggml.token_type") {
            None => vec![token_type::NORMAL; tokens.len()],
            Some(v) => v
                .as_array()
                .ok_or("`tokenizer.ggml.token_type` is not an array")?
                .iter()
                .map(|x| {
                    x.as_u64()
                        .map(|t| t as i32)
                        .ok_or("`tokenizer.ggml.token_type` holds a non-integer")
                })
                .collect::<std::result::Result<_, _>>()?,
        };
        let scores = match h.get("tokenizer.ggml.scores") {
            None => Vec::new(),
            Some(v) => v
                .as_array()
                .ok_or("`tokenizer.ggml.scores` is not an array")?
                .iter()
                .map(|x| {
                    x.as_f64()
                        .map(|s| s as f32)
                        .ok_or("`tokenizer.ggml.scores` holds a non-number")
                })
                .collect::<std::result::Result<_, _>>()?,
        };
        if types.len() != tokens.len() || (!scores.is_empty() && scores.len() != tokens.len()) {
            return Err("token, type and score arrays differ in length".into());
        }
        let id = |key: &str| -> std::result::Result<Option<u32>, String> {
            match h.get(key).and_then(MetaValue::as_u64) {
                None => Ok(None),
                Some(i) if (i as usize) < tokens.len() => Ok(Some(i as u32)),
                Some(i) => Err(format!("`{key}` = {i} is not a token id")),
            }
        };
        let flag =
            |key: &str, default: bool| h.get(key).and_then(MetaValue::as_bool).unwrap_or(default);
        let is_spm = model == "llama";
        Ok(GgufVocab {
            pre: h
                .get("tokenizer.ggml.pre")
                .and_then(MetaValue::as_str)
                .map(str::to_string),
            merges: strings("tokenizer.ggml.merges")?,
            bos_id: id("tokenizer.ggml.bos_token_id")?,
            eos_id: id("tokenizer.ggml.eos_token_id")?,
            eot_id: id("tokenizer.ggml.eot_token_id")?,
            eom_id: id("tokenizer.ggml.eom_token_id")?,
            unk_id: id("tokenizer.ggml.unknown_token_id")?,
            pad_id: id("tokenizer.ggml.padding_token_id")?,
            add_bos: flag("tokenizer.ggml.add_bos_token", is_spm),
            add_space_prefix: flag("tokenizer.ggml.add_space_prefix", is_spm),
            model,
            tokens,
            types,
            scores,
        })
    }

    fn added_tokens(&self) -> Vec<Value> {
        self.tokens
            .iter()
            .zip(&self.types)
            .enumerate()
            .filter(|(_, (_, t))| {
                matches!(
                    **t,
                    token_type::CONTROL | token_type::USER_DEFINED | token_type::UNKNOWN
                )
            })
            .map(|(id, (content, t))| {
                json!({
                    "id": id,
                    "content": content,
                    "single_word": false,
                    "lstrip": false,
                    "rstrip": false,
                    "normalized": false,
                    "special": *t != token_type::USER_DEFINED,
                })
            })
            .collect()
    }

    fn vocab_json(&self) -> serde_json::Map<String, Value> {
        let mut vocab = serde_json::Map::with_capacity(self.tokens.len());
        for (id, t) in self.tokens.iter().enumerate() {
            // Duplicate texts (unused slots) keep their first id, as a HashMap-built vocab would.
            vocab.entry(t.clone()).or_insert(json!(id));
        }
        vocab
    }

    fn post_processor(&self, byte_level: bool) -> Value {
        let bos = self
            .bos_id
            .filter(|_| self.add_bos)
            .map(|id| bos_template(&self.tokens[id as usize], &json!(id)));
        let mut parts = Vec::new();
        if byte_level {
            parts.push(json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true}));
        }
        parts.extend(bos);
        match parts.len() {
            0 => Value::Null,
            1 => parts.pop().unwrap_or(Value::Null),
            _ => json!({"type": "Sequence", "processors": parts}),
        }
    }

    /// A `tokenizer.json` document equivalent to this vocabulary.
    pub fn to_tokenizer_json(&self) -> std::result::Result<Value, String> {
        match self.model.as_str() {
            "gpt2" => Ok(self.bpe_json()),
            "llama" => Ok(self.spm_json()),
            other => Err(format!(
                "tokenizer model `{other}` is not supported (llmesh reads `gpt2` and `llama` vocabularies)"
            )),
        }
    }

    fn bpe_json(&self) -> Value {
        let merges: Vec<Value> = self
            .merges
            .iter()
            .filter_map(|m| m.split_once(' ').map(|(a, b)| json!([a, b])))
            .collect();
        let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false});
        let (pattern, ignore_merges, nfc) = match self.pre.as_deref() {
            Some("llama-bpe" | "llama3" | "llama-v3" | "smaug-bpe") => {
                (Some(LLAMA3_PATTERN), true, false)
            }
            Some("qwen2") => (Some(QWEN2_PATTERN), false, true),
            Some("default" | "gpt2" | "gpt-2") | None => (None, false, false),
            Some(other) => {
                tracing::warn!(
                    pre = other,
                    "unknown GGUF pre-tokenizer; using GPT-2's split rules"
                );
                (None, false, false)
            }
        };
        let pre_tokenizer = match pattern {
            Some(p) => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": p}, "behavior": "Isolated", "invert": false},
                byte_level,
            ]}),
            None => {
                json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true})
            }
        };
        json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": self.added_tokens(),
            "normalizer": if nfc { json!({"type": "NFC"}) } else { Value::Null },
            "pre_tokenizer": pre_tokenizer,
            "post_processor": self.post_processor(true),
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE",
                "dropout": null,
                "unk_token": null,
                "continuing_subword_prefix": null,
                "end_of_word_suffix": null,
                "fuse_unk": false,
                "byte_fallback": false,
                "ignore_merges": ignore_merges,
                "vocab": self.vocab_json(),
                "merges": merges,
            },
        })
    }

    fn spm_json(&self) -> Value {
        let merges: Vec<Value> = spm_merges(&self.tokens, &self.scores, &self.types)
            .into_iter()
            .map(|(a, b)| json!([a, b]))
            .collect();
        let mut normalizers = Vec::new();
        if self.add_space_prefix {
            normalizers.push(json!({"type": "Prepend", "prepend": "\u{2581}"}));
        }
        normalizers
            .push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}));
        let mut decoders = vec![
            json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
            json!({"type": "ByteFallback"}),
            json!({"type": "Fuse"}),
        ];
        if self.add_space_prefix {
            decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        let unk = self.unk_id.map(|i| self.tokens[i as usize].clone());
        json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": self.added_tokens(),
            "normalizer": {"type": "Sequence", "normalizers": normalizers},
            "pre_tokenizer": null,
            "post_processor": self.post_processor(false),
            "decoder": {"type": "Sequence", "decoders": decoders},
            "model": {
                "type": "BPE",
                "dropout": null,
                "unk_token": unk,
                "continuing_subword_prefix": null,
                "end_of_word_suffix": null,
                "fuse_unk": true,
                "byte_fallback": true,
                "ignore_merges": false,
                "vocab": self.vocab_json(),
                "merges": merges,
            },
        })
    }
}

/// BPE merges equivalent to SentencePiece's score-ordered merging, as transformers derives them:
/// every split of every normal piece into two pieces of the vocabulary, ordered by the score of
/// the merged piece (highest first), then by the ids of the two halves.
pub fn spm_merges(tokens: &[String], scores: &[f32], types: &[i32]) -> Vec<(String, String)> {
    use std::collections::HashMap;
    let mergeable = |i: usize| {
        matches!(
            types.get(i).copied().unwrap_or(token_type::NORMAL),
            token_type::NORMAL | token_type::USER_DEFINED
        )
    };
    let ids: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| mergeable(*i))
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let score = |i: usize| scores.get(i).copied().unwrap_or(-(i as f32));
    let mut order: Vec<usize> = (0..tokens.len()).filter(|&i| mergeable(i)).collect();
    order.sort_by(|&a, &b| score(b).total_cmp(&score(a)).then(a.cmp(&b)));
    let mut merges = Vec::new();
    for i in order {
        let piece = &tokens[i];
        let mut local: Vec<(usize, usize, &str, &str)> = piece
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| {
                let (l, r) = piece.split_at(at);
                Some((*ids.get(l)?, *ids.get(r)?, l, r))
            })
            .collect();
        local.sort();
        merges.extend(
            local
                .into_iter()
                .map(|(_, _, l, r)| (l.to_string(), r.to_string())),
        );
    }
    merges
}

impl GgufVocab {
    /// Converts a byte-level BPE `tokenizer.json` (GPT-2 / Llama 3 / Qwen style) into GGUF
    /// vocabulary facts, as llama.cpp's converter does. `add_bos` and the BOS/EOS texts come from
    /// `tokenizer_config.json`.
    pub fn from_bpe_tokenizer_json(
        json: &Value,
        add_bos: bool,
        bos: Option<&str>,
        eos: Option<&str>,
    ) -> std::result::Result<Self, String> {
        let model = json.get("model").ok_or("no `model`")?;
        if model.get("type").and_then(Value::as_str) != Some("BPE") {
            return Err("only BPE tokenizer.json files convert to a `gpt2` GGUF vocabulary".into());
        }
        if model.get("byte_fallback").and_then(Value::as_bool) == Some(true) {
            return Err("a byte-fallback BPE is a SentencePiece vocabulary, not `gpt2`".into());
        }
        let vocab = model
            .get("vocab")
            .and_then(Value::as_object)
            .ok_or("no `model.vocab`")?;
        let added = json
            .get("added_tokens")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let mut by_id: Vec<Option<(String, i32)>> = Vec::new();
        let mut put = |id: usize, text: &str, ty: i32| {
            if by_id.len() <= id {
                by_id.resize(id + 1, None);
            }
            by_id[id] = Some((text.to_string(), ty));
        };
        for (text, id) in vocab {
            let id = id.as_u64().ok_or("a vocab id is not a number")? as usize;
            put(id, text, token_type::NORMAL);
        }
        for t in &added {
            let id = t
                .get("id")
                .and_then(Value::as_u64)
                .ok_or("an added token has no id")? as usize;
            let text = t
                .get("content")
                .and_then(Value::as_str)
                .ok_or("an added token has no content")?;
            let special = t.get("special").and_then(Value::as_bool).unwrap_or(false);
            put(
                id,
                text,
                if special {
                    token_type::CONTROL
                } else {
                    token_type::USER_DEFINED
                },
            );
        }
        let (tokens, types): (Vec<String>, Vec<i32>) = by_id
            .into_iter()
            .enumerate()
            .map(|(i, t)| t.unwrap_or_else(|| (format!("[PAD{i}]"), token_type::UNUSED)))
            .unzip();
        let merges = model
            .get("merges")
            .and_then(Value::as_array)
            .ok_or("no `model.merges`")?
            .iter()
            .map(|m| match m {
                Value::String(s) => Ok(s.clone()),
                Value::Array(p) if p.len() == 2 => Ok(format!(
                    "{} {}",
                    p[0].as_str().ok_or("a merge is not text")?,
                    p[1].as_str().ok_or("a merge is not text")?
                )),
                _ => Err("a merge is neither \"a b\" nor [a, b]".to_string()),
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let pre_text = json
            .get("pre_tokenizer")
            .map(Value::to_string)
            .unwrap_or_default();
        let pattern_json = |p: &str| Value::String(p.to_string()).to_string();
        let pre = if pre_text.contains(&pattern_json(LLAMA3_PATTERN)) {
            "llama-bpe"
        } else if pre_text.contains(&pattern_json(QWEN2_PATTERN)) {
            "qwen2"
        } else {
            "default"
        };
        let find = |t: Option<&str>| {
            t.and_then(|t| tokens.iter().position(|x| x == t))
                .map(|i| i as u32)
        };
        Ok(GgufVocab {
            model: "gpt2".into(),
            pre: Some(pre.into()),
            bos_id: find(bos),
            eos_id: find(eos),
            eot_id: None,
            eom_id: None,
            unk_id: None,
            pad_id: None,
            add_bos,
            add_space_prefix: false,
            scores: Vec::new(),
            merges,
            tokens,
            types,
        })
    }

    /// The `tokenizer.ggml.*` metadata entries.
    pub fn to_metadata(&self) -> Vec<(String, MetaValue)> {
        let mut m = vec![(
            "tokenizer.ggml.model".to_string(),
            MetaValue::String(self.model.clone()),
        )];
        if let Some(pre) = &self.pre {
            m.push(("tokenizer.ggml.pre".into(), MetaValue::String(pre.clone())));
        }
        m.push((
            "tokenizer.ggml.tokens".into(),
            MetaValue::Array(
                self.tokens
                    .iter()
                    .map(|t| MetaValue::String(t.clone()))
                    .collect(),
            ),
        ));
        if !self.scores.is_empty() {
            m.push((
                "tokenizer.ggml.scores".into(),
                MetaValue::Array(self.scores.iter().map(|s| MetaValue::F32(*s)).collect()),
            ));
        }
        m.push((
            "tokenizer.ggml.token_type".into(),
            MetaValue::Array(self.types.iter().map(|t| MetaValue::I32(*t)).collect()),
        ));
        if !self.merges.is_empty() {
            m.push((
                "tokenizer.ggml.merges".into(),
                MetaValue::Array(
                    self.merges
                        .iter()
                        .map(|t| MetaValue::String(t.clone()))
                        .collect(),
                ),
            ));
        }
        let ids = [
            ("bos_token_id", self.bos_id),
            ("eos_token_id", self.eos_id),
            ("eot_token_id", self.eot_id),
            ("eom_token_id", self.eom_id),
            ("unknown_token_id", self.unk_id),
            ("padding_token_id", self.pad_id),
        ];
        for (key, id) in ids {
            if let Some(id) = id {
                m.push((format!("tokenizer.ggml.{key}"), MetaValue::U32(id)));
            }
        }
        m.push((
            "tokenizer.ggml.add_bos_token".into(),
            MetaValue::Bool(self.add_bos),
        ));
        if self.model == "llama" {
            m.push((
                "tokenizer.ggml.add_space_prefix".into(),
                MetaValue::Bool(self.add_space_prefix),
            ));
        }
        m
    }
}
