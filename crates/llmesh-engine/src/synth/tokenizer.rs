//! Trained tokenizers for the generated test models, in the two families real models use:
//! byte-level BPE (Llama 3, Qwen) and SentencePiece-style BPE with byte fallback (Llama 2,
//! Mistral). Training is a small deterministic BPE over an embedded corpus, so the same
//! arguments always give the same vocabulary.

use std::collections::HashMap;

use serde_json::{Value, json};
use tokenizers::{
    OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, PreTokenizerWrapper,
};

use crate::error::{Error, Result};
use crate::tokenizer::{GgufVocab, LLAMA3_PATTERN, QWEN2_PATTERN, token_type};

const CORPUS: &str = include_str!("corpus.txt");

/// Which tokenizer family to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenizerStyle {
    /// Byte-level BPE with Llama 3's split pattern and header tokens.
    Llama3,
    /// Byte-level BPE with Qwen2's split pattern and ChatML tokens.
    Qwen,
    /// Qwen with Qwen3's extra (non-special) reasoning and tool tokens.
    Qwen3,
    /// SentencePiece BPE with byte fallback, as Llama 2.
    Llama2,
    /// SentencePiece BPE with byte fallback and `[INST]` control tokens, as Mistral.
    Mistral,
}

/// A built tokenizer: its Hugging Face files and its GGUF vocabulary.
pub struct BuiltTokenizer {
    /// `tokenizer.json`.
    pub tokenizer_json: Value,
    /// `tokenizer_config.json` (without the chat template).
    pub tokenizer_config: Value,
    /// The same vocabulary for GGUF.
    pub vocab: GgufVocab,
    /// Ids that end generation (for config.json / generation_config.json).
    pub eos_ids: Vec<u32>,
    /// The BOS id, if the model has one.
    pub bos_id: Option<u32>,
}

/// Learns `n_merges` merges over words given as symbol sequences with counts. Deterministic: the
/// most frequent pair wins, ties go to the pair whose merged text sorts first.
fn learn_merges(words: &[(Vec<String>, u64)], n_merges: usize) -> Vec<(String, String)> {
    let mut symbols: Vec<String> = Vec::new();
    let mut ids: HashMap<String, u32> = HashMap::new();
    let mut intern = |s: &str, symbols: &mut Vec<String>| -> u32 {
        if let Some(&i) = ids.get(s) {
            return i;
        }
        let i = symbols.len() as u32;
        symbols.push(s.to_string());
        ids.insert(s.to_string(), i);
        i
    };
    let mut words: Vec<(Vec<u32>, u64)> = words
        .iter()
        .map(|(w, c)| (w.iter().map(|s| intern(s, &mut symbols)).collect(), *c))
        .collect();
    let mut merges = Vec::new();
    while merges.len() < n_merges {
        let mut counts: HashMap<(u32, u32), u64> = HashMap::new();
        for (w, c) in &words {
            for p in w.windows(2) {
                *counts.entry((p[0], p[1])).or_default() += c;
            }
        }
        let best = counts
            .iter()
            .filter(|(_, c)| **c >= 2)
            .max_by(|a, b| {
                a.1.cmp(b.1).then_with(|| {
                    let ta = (&symbols[a.0.0 as usize], &symbols[a.0.1 as usize]);
                    let tb = (&symbols[b.0.0 as usize], &symbols[b.0.1 as usize]);
                    tb.cmp(&ta)
                })
            })
            .map(|(p, _)| *p);
        let Some((a, b)) = best else {
            fill_merges(&mut symbols, &mut merges, n_merges);
            break;
        };
        let merged = format!("{}{}", symbols[a as usize], symbols[b as usize]);
        let m = intern(&merged, &mut symbols);
        merges.push((symbols[a as usize].clone(), symbols[b as usize].clone()));
        for (w, _) in &mut words {
            let mut out = Vec::with_capacity(w.len());
            let mut i = 0;
            while i < w.len() {
                if i + 1 < w.len() && w[i] == a && w[i + 1] == b {
                    out.push(m);
                    i += 2;
                } else {
                    out.push(w[i]);
                    i += 1;
                }
            }
            *w = out;
        }
    }
    merges
}

/// Once the corpus has no pair left that occurs twice, tops the merges up to `n_merges` with
/// pairs of known symbols chosen by a fixed pseudo-random sequence, so that a model can have a
/// real model's vocabulary size (32,000 and more) although the embedded corpus is small. Every
/// added merge joins two symbols that are already reachable, so the vocabulary stays a valid BPE.
fn fill_merges(symbols: &mut Vec<String>, merges: &mut Vec<(String, String)>, n_merges: usize) {
    const MAX_CHARS: usize = 12;
    let mut known: std::collections::HashSet<String> = symbols.iter().cloned().collect();
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = |n: usize| {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((state >> 33) % n as u64) as usize
    };
    let mut misses = 0;
    while merges.len() < n_merges && misses < 1_000_000 {
        let a = symbols[next(symbols.len())].clone();
        let b = symbols[next(symbols.len())].clone();
        let merged = format!("{a}{b}");
        if merged.chars().count() > MAX_CHARS || known.contains(&merged) {
            misses += 1;
            continue;
        }
        known.insert(merged.clone());
        symbols.push(merged);
        merges.push((a, b));
    }
}

fn count_words(words: impl Iterator<Item = String>) -> Vec<(String, u64)> {
    let mut counts: HashMap<String, u64> = HashMap::new();
    for w in words {
        *counts.entry(w).or_default() += 1;
    }
    let mut v: Vec<(String, u64)> = counts.into_iter().collect();
    v.sort();
    v
}

fn added(id: usize, content: &str, special: bool) -> Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
           "normalized": false, "special": special})
}

/// Builds a tokenizer of `style` with about `vocab_size` tokens.
pub fn build(style: TokenizerStyle, vocab_size: usize) -> Result<BuiltTokenizer> {
    match style {
        TokenizerStyle::Llama3 | TokenizerStyle::Qwen | TokenizerStyle::Qwen3 => {
            byte_level(style, vocab_size)
        }
        TokenizerStyle::Llama2 | TokenizerStyle::Mistral => sentencepiece(style, vocab_size),
    }
}

fn byte_level(style: TokenizerStyle, vocab_size: usize) -> Result<BuiltTokenizer> {
    let pattern = if style == TokenizerStyle::Llama3 {
        LLAMA3_PATTERN
    } else {
        QWEN2_PATTERN
    };
    let pre_tokenizer = json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
    ]});
    let pre: PreTokenizerWrapper = serde_json::from_value(pre_tokenizer.clone())
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    let mut pieces = Vec::new();
    for line in CORPUS.split_inclusive('\n') {
        let mut s = PreTokenizedString::from(line);
        pre.pre_tokenize(&mut s)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        for (piece, _, _) in s.get_splits(OffsetReferential::Original, OffsetType::Byte) {
            pieces.push(piece.to_string());
        }
    }
    let words: Vec<(Vec<String>, u64)> = count_words(pieces.into_iter())
        .into_iter()
        .map(|(w, c)| (w.chars().map(String::from).collect(), c))
        .collect();
    let mut alphabet: Vec<char> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
        .into_iter()
        .collect();
    alphabet.sort_unstable();
    let merges = learn_merges(&words, vocab_size.saturating_sub(alphabet.len() + 16));
    let mut vocab = serde_json::Map::new();
    for c in &alphabet {
        vocab.insert(c.to_string(), json!(vocab.len()));
    }
    for (a, b) in &merges {
        let m = format!("{a}{b}");
        if !vocab.contains_key(&m) {
            vocab.insert(m, json!(vocab.len()));
        }
    }
    let base = vocab.len();
    let (specials, extra): (Vec<&str>, Vec<&str>) = match style {
        TokenizerStyle::Llama3 => (
            vec![
                "<|begin_of_text|>",
                "<|end_of_text|>",
                "<|reserved_special_token_0|>",
                "<|reserved_special_token_1|>",
                "<|finetune_right_pad_id|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eom_id|>",
                "<|eot_id|>",
                "<|python_tag|>",
            ],
            vec![],
        ),
        TokenizerStyle::Qwen => (vec!["<|endoftext|>", "<|im_start|>", "<|im_end|>"], vec![]),
        _ => (
            vec!["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            vec!["<think>", "</think>", "<tool_call>", "</tool_call>"],
        ),
    };
    let mut added_tokens = Vec::new();
    for (i, s) in specials.iter().enumerate() {
        added_tokens.push(added(base + i, s, true));
    }
    for (i, s) in extra.iter().enumerate() {
        added_tokens.push(added(base + specials.len() + i, s, false));
    }
    let id_of = |t: &str| {
        specials
            .iter()
            .position(|s| *s == t)
            .map(|i| (base + i) as u32)
    };
    let (bos, eos, eos_ids) = match style {
        TokenizerStyle::Llama3 => (
            Some("<|begin_of_text|>"),
            "<|eot_id|>",
            vec!["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
        ),
        _ => (None, "<|im_end|>", vec!["<|im_end|>", "<|endoftext|>"]),
    };
    let bos_id = bos.and_then(id_of);
    let post_processor = match (bos, bos_id) {
        (Some(b), Some(id)) => json!({"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
            {"type": "TemplateProcessing",
             "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
             "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                      {"SpecialToken": {"id": b, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
             "special_tokens": {b: {"id": b, "ids": [id], "tokens": [b]}}},
        ]}),
        _ => {
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false})
        }
    };
    let tokenizer_json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": if style == TokenizerStyle::Llama3 { Value::Null } else { json!({"type": "NFC"}) },
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": style == TokenizerStyle::Llama3,
            "vocab": vocab,
            "merges": merges.iter().map(|(a, b)| json!([a, b])).collect::<Vec<_>>(),
        },
    });
    // Round-trip through the tokenizers crate so the file is exactly what it writes.
    let parsed = tokenizers::Tokenizer::from_str(&tokenizer_json.to_string())
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    let text = parsed
        .to_string(false)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    let tokenizer_json: Value =
        serde_json::from_str(&text).map_err(|e| Error::Tokenizer(e.to_string()))?;
    let mut tokenizer_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": false,
        "bos_token": bos,
        "eos_token": eos,
        "model_max_length": 131072,
    });
    if style != TokenizerStyle::Llama3 {
        tokenizer_config["pad_token"] = json!("<|endoftext|>");
        tokenizer_config["errors"] = json!("replace");
    }
    let mut vocab =
        GgufVocab::from_bpe_tokenizer_json(&tokenizer_json, bos.is_some(), bos, Some(eos))
            .map_err(Error::Tokenizer)?;
    vocab.eot_id = id_of(eos);
    if style == TokenizerStyle::Llama3 {
        vocab.eom_id = id_of("<|eom_id|>");
    } else {
        vocab.pad_id = id_of("<|endoftext|>");
    }
    Ok(BuiltTokenizer {
        tokenizer_json,
        tokenizer_config,
        vocab,
        eos_ids: eos_ids.into_iter().filter_map(id_of).collect(),
        bos_id,
    })
}

fn sentencepiece(style: TokenizerStyle, vocab_size: usize) -> Result<BuiltTokenizer> {
    const SPACE: char = '\u{2581}';
    // Normalise as the tokenizer will (a leading space, spaces as ▁) and cut words before each ▁.
    let mut words = Vec::new();
    let mut char_counts: HashMap<char, u64> = HashMap::new();
    for line in CORPUS.lines() {
        let norm: String = std::iter::once(SPACE)
            .chain(line.chars().map(|c| if c == ' ' { SPACE } else { c }))
            .collect();
        let mut cur = String::new();
        for c in norm.chars() {
            if c == SPACE && !cur.is_empty() && !cur.ends_with(SPACE) {
                words.push(std::mem::take(&mut cur));
            }
            cur.push(c);
            *char_counts.entry(c).or_default() += 1;
        }
        if !cur.is_empty() {
            words.push(cur);
        }
    }
    // Rare characters are left to byte fallback, as SentencePiece's character coverage does.
    let mut chars: Vec<(char, u64)> = char_counts
        .into_iter()
        .filter(|(c, n)| *n >= 3 && *c != '\t')
        .collect();
    chars.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let alphabet: Vec<char> = chars.into_iter().map(|(c, _)| c).collect();
    let known: std::collections::HashSet<char> = alphabet.iter().copied().collect();
    // Characters outside the alphabet split words: they never take part in merges.
    let mut segments = Vec::new();
    for w in words {
        let mut cur = Vec::new();
        for c in w.chars() {
            if known.contains(&c) {
                cur.push(c.to_string());
            } else if !cur.is_empty() {
                segments.push(std::mem::take(&mut cur).concat());
            }
        }
        if !cur.is_empty() {
            segments.push(cur.concat());
        }
    }
    let segments: Vec<(Vec<String>, u64)> = count_words(segments.into_iter())
        .into_iter()
        .map(|(w, c)| (w.chars().map(String::from).collect(), c))
        .collect();
    let mut control = vec!["<s>", "</s>"];
    if style == TokenizerStyle::Mistral {
        control.extend(["[INST]", "[/INST]"]);
    }
    let fixed = 1 + control.len() + 256 + alphabet.len();
    let merges = learn_merges(&segments, vocab_size.saturating_sub(fixed));
    let mut tokens = vec!["<unk>".to_string()];
    let mut types = vec![token_type::UNKNOWN];
    let mut scores = vec![0.0f32];
    for c in &control {
        tokens.push(c.to_string());
        types.push(token_type::CONTROL);
        scores.push(0.0);
    }
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(token_type::BYTE);
        scores.push(0.0);
    }
    let mut seen: std::collections::HashSet<String> = tokens.iter().cloned().collect();
    let mut rank = 0f32;
    for piece in alphabet
        .iter()
        .map(|c| c.to_string())
        .chain(merges.iter().map(|(a, b)| format!("{a}{b}")))
    {
        if seen.insert(piece.clone()) {
            tokens.push(piece);
            types.push(token_type::NORMAL);
            scores.push(-rank);
            rank += 1.0;
        }
    }
    let vocab = GgufVocab {
        model: "llama".into(),
        pre: Some("default".into()),
        bos_id: Some(1),
        eos_id: Some(2),
        eot_id: None,
        eom_id: None,
        unk_id: Some(0),
        pad_id: None,
        add_bos: true,
        add_space_prefix: true,
        tokens,
        types,
        scores,
        merges: Vec::new(),
    };
    let tokenizer_json = vocab.to_tokenizer_json().map_err(Error::Tokenizer)?;
    let tokenizer_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": false,
        "add_bos_token": true,
        "add_eos_token": false,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "legacy": true,
        "model_max_length": 32768,
    });
    Ok(BuiltTokenizer {
        tokenizer_json,
        tokenizer_config,
        vocab,
        eos_ids: vec![2],
        bos_id: Some(1),
    })
}

use std::str::FromStr;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn training_is_deterministic_and_finds_common_words() {
        let a = build(TokenizerStyle::Llama3, 600).unwrap();
        let b = build(TokenizerStyle::Llama3, 600).unwrap();
        assert_eq!(a.tokenizer_json, b.tokenizer_json);
        let vocab = a.tokenizer_json["model"]["vocab"].as_object().unwrap();
        assert!(vocab.contains_key("Ġthe"), "no merge for ' the'");
        let s = build(TokenizerStyle::Mistral, 600).unwrap();
        assert!(s.vocab.tokens.iter().any(|t| t == "\u{2581}the"));
        assert_eq!(s.vocab.tokens.len(), s.vocab.scores.len());
    }

    #[test]
    fn a_real_vocabulary_size_is_reached_past_the_corpus() {
        for style in [TokenizerStyle::Llama3, TokenizerStyle::Mistral] {
            let t = build(style, 32_000).unwrap();
            let n = t.vocab.tokens.len();
            assert!((31_900..=32_100).contains(&n), "{style:?}: {n} tokens");
            let unique: std::collections::HashSet<&String> = t.vocab.tokens.iter().collect();
            assert_eq!(unique.len(), n, "{style:?}: repeated tokens");
        }
    }
}
