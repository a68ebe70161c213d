//! The tokenizer rebuilt from GGUF metadata gives exactly the ids of `tokenizer.json`, on mixed
//! text with code, many scripts, odd whitespace and special tokens; and encoding round-trips.
#![allow(clippy::unwrap_used)]

mod common;

use llmesh_engine::gguf_export::FileType;
use llmesh_engine::synth::{SynthSpec, TokenizerStyle};
use llmesh_engine::{Architecture, ModelFiles};
use rand::{Rng, SeedableRng};

const FRAGMENTS: &[&str] = &[
    "The quick brown fox jumps over the lazy dog. ",
    "fn main() {\n    let x: Vec<u32> = (0..10).map(|i| i * i).collect();\n    println!(\"{x:?}\");\n}\n",
    "def f(a, b=2):\n\treturn a ** b  # comment\n",
    "SELECT * FROM t WHERE id IN (1, 2, 3);",
    "  leading and trailing spaces   ",
    "\n\n\n",
    "\r\n",
    "\t\t",
    "1234567890 3.14159 -42 1e-9 0x1F ",
    "don't won't I'm you're they've we'll she'd ",
    "café naïve façade Ångström ",
    "Ελληνικά κείμενα ",
    "привет мир ",
    "你好，世界。",
    "こんにちは、世界！",
    "안녕하세요 ",
    "مرحبا بالعالم ",
    "नमस्ते दुनिया ",
    "🙂🚀🎉👍🏽👨‍👩‍👧 ",
    "∀x∈ℝ: x²≥0 ",
    "<html><b>bold</b></html>",
    "{\"key\": [1, 2, {\"nested\": null}]}",
    "zzqxjv unseenword ",
    "ǅ ǈ ǋ ﬁ ﬂ ",
    "   ",
];

fn mixed_text(specials: &[&str], seed: u64, min_chars: usize) -> String {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut s = String::new();
    while s.chars().count() < min_chars {
        if !specials.is_empty() && rng.random_bool(0.08) {
            s.push_str(specials[rng.random_range(0..specials.len())]);
        } else {
            s.push_str(FRAGMENTS[rng.random_range(0..FRAGMENTS.len())]);
        }
    }
    s
}

fn check(style: TokenizerStyle, arch: Architecture, specials: &[&str]) {
    let m = common::model(&format!("tok-{style:?}"), || {
        let mut s = SynthSpec::new(arch);
        s.tokenizer = style;
        s.layers = 1;
        s.gguf = vec![FileType::Q8_0];
        s
    });
    let hf = ModelFiles::open(&m.dir).unwrap();
    let gguf = ModelFiles::open(m.gguf_path(FileType::Q8_0).unwrap()).unwrap();
    let text = mixed_text(specials, 7, 12_000);
    assert!(text.chars().count() >= 10_000);
    for add_special in [true, false] {
        let a = hf.tokenizer().encode(&text, add_special).unwrap();
        let b = gguf.tokenizer().encode(&text, add_special).unwrap();
        if a != b {
            let i = a
                .iter()
                .zip(&b)
                .position(|(x, y)| x != y)
                .unwrap_or(a.len().min(b.len()));
            panic!(
                "{style:?}: ids differ at {i}: tokenizer.json {:?} vs GGUF {:?}",
                &a[i.saturating_sub(3)..(i + 5).min(a.len())],
                &b[i.saturating_sub(3)..(i + 5).min(b.len())]
            );
        }
        // Special tokens in the text are recognised as single ids.
        for sp in specials {
            let id = hf.tokenizer().token_id(sp).unwrap();
            assert!(a.contains(&id), "{style:?}: {sp} not found as a token");
        }
    }
    let ids = hf.tokenizer().encode(&text, false).unwrap();
    let back = hf.tokenizer().decode(&ids, false).unwrap();
    let back_gguf = gguf.tokenizer().decode(&ids, false).unwrap();
    assert_eq!(back, back_gguf, "{style:?}: decoding differs");
    // Byte-level vocabularies reproduce text exactly. Legacy SentencePiece adds a space after
    // each special token (as transformers does); everything else comes back.
    let no_spaces = |s: &str| s.replace(' ', "");
    match style {
        TokenizerStyle::Llama2 | TokenizerStyle::Mistral => {
            assert_eq!(no_spaces(&back), no_spaces(&text))
        }
        _ => assert_eq!(back, text),
    }
    assert!(!hf.eos_ids().is_empty());
    assert_eq!(hf.tokenizer().vocab_size(), gguf.tokenizer().vocab_size());
}

#[test]
fn llama3_byte_level_bpe() {
    check(
        TokenizerStyle::Llama3,
        Architecture::Llama,
        &["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>"],
    );
}

#[test]
fn qwen_byte_level_bpe() {
    check(
        TokenizerStyle::Qwen,
        Architecture::Qwen2,
        &["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
    );
}

#[test]
fn qwen3_with_added_non_special_tokens() {
    check(
        TokenizerStyle::Qwen3,
        Architecture::Qwen3,
        &["<|im_start|>", "<think>", "</tool_call>"],
    );
}

#[test]
fn llama2_sentencepiece_with_byte_fallback() {
    check(
        TokenizerStyle::Llama2,
        Architecture::Llama,
        &["<s>", "</s>"],
    );
}

#[test]
fn mistral_sentencepiece_with_control_tokens() {
    check(
        TokenizerStyle::Mistral,
        Architecture::Mistral,
        &["[INST]", "[/INST]", "</s>"],
    );
}

#[test]
fn bos_follows_the_tokenizer_configuration() {
    for (style, arch, bos) in [
        (
            TokenizerStyle::Llama3,
            Architecture::Llama,
            Some("<|begin_of_text|>"),
        ),
        (TokenizerStyle::Mistral, Architecture::Mistral, Some("<s>")),
        (TokenizerStyle::Qwen, Architecture::Qwen2, None),
    ] {
        let m = common::model(&format!("tok-{style:?}"), || {
            let mut s = SynthSpec::new(arch);
            s.tokenizer = style;
            s.layers = 1;
            s.gguf = vec![FileType::Q8_0];
            s
        });
        for path in [
            m.dir.clone(),
            m.gguf_path(FileType::Q8_0).unwrap().to_path_buf(),
        ] {
            let f = ModelFiles::open(&path).unwrap();
            let with = f.tokenizer().encode("hello world", true).unwrap();
            let without = f.tokenizer().encode("hello world", false).unwrap();
            match bos {
                Some(b) => {
                    let id = f.tokenizer().token_id(b).unwrap();
                    assert_eq!(with[0], id, "{style:?} {path:?}");
                    assert_eq!(&with[1..], &without[..]);
                }
                None => assert_eq!(with, without),
            }
        }
    }
}
