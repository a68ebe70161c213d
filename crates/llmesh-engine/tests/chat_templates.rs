//! Chat templates render exactly as transformers' `apply_chat_template` renders them. The
//! expected texts in `data/chat_templates.json` were produced by transformers itself from the
//! generated models (`scripts/chat-template-golden.py`); this test renders the same
//! conversations with llmesh's minijinja setup.
#![allow(clippy::unwrap_used)]

use llmesh_engine::synth::templates;
use llmesh_engine::{ChatTemplate, Message};
use serde_json::Value;

fn template(name: &str) -> ChatTemplate {
    let (src, bos, eos) = match name {
        "llama3" => (templates::LLAMA3, "<|begin_of_text|>", "<|eot_id|>"),
        "chatml" => (templates::CHATML, "", "<|im_end|>"),
        "qwen3" => (templates::QWEN3, "", "<|im_end|>"),
        "mistral" => (templates::MISTRAL, "<s>", "</s>"),
        "llama2" => (templates::LLAMA2, "<s>", "</s>"),
        other => panic!("unknown template {other}"),
    };
    ChatTemplate::new(src, Some(bos).filter(|b| !b.is_empty()), Some(eos)).unwrap()
}

#[test]
fn templates_render_as_transformers_does() {
    let text = include_str!("data/chat_templates.json");
    let cases: Vec<Value> = serde_json::from_str(text).unwrap();
    assert!(cases.len() >= 40);
    let mut failures = Vec::new();
    for c in &cases {
        let name = c["template"].as_str().unwrap();
        let t = template(name);
        let messages: Vec<Message> = c["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let tools = c.get("tools").filter(|t| !t.is_null());
        let extra = c["extra"].as_object().unwrap();
        let got = t.render_with(
            &messages,
            c["add_generation_prompt"].as_bool().unwrap(),
            tools,
            extra,
        );
        let case = c["case"].as_str().unwrap();
        match (&c["expected"]["text"], &c["expected"]["error"], got) {
            (Value::String(want), _, Ok(got)) if *want == got => {}
            (_, Value::String(want), Err(e)) if e.to_string().contains(want.as_str()) => {}
            (want_text, want_err, got) => failures.push(format!(
                "{name} / {case}:\n  transformers: {want_text} {want_err}\n  llmesh:       {got:?}"
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
