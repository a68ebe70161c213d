//! `llmesh generate`: a raw completion, streamed to stdout or printed as one JSON object.

use std::io::Write;

use anyhow::Result;
use llmesh_engine::{GenerateRequest, LocalRunner, generate};
use serde_json::json;

use crate::cli::GenerateArgs;

pub fn run(args: GenerateArgs) -> Result<()> {
    let (files, shard) = super::load_model(&args.model)?;
    let tokenizer = files.tokenizer();
    let prompt = tokenizer.encode(&args.prompt, true)?;
    let mut req = GenerateRequest::new(prompt.clone(), args.sampling.max_tokens);
    req.sampling = super::sampling(&args.sampling)?;
    req.stop = args.sampling.stop.clone();
    req.stop_ids = files.eos_ids().to_vec();
    req.logprobs = args.logprobs;
    let mut runner = LocalRunner::new(&shard, &req)?;
    let stdout = std::io::stdout();
    let out = if args.json {
        generate(&mut runner, tokenizer, &req, &mut |_| true)?
    } else {
        let mut lock = stdout.lock();
        let g = generate(&mut runner, tokenizer, &req, &mut |ev| {
            // A closed stdout (e.g. piped to `head`) ends generation quietly.
            lock.write_all(ev.text.as_bytes())
                .and_then(|_| lock.flush())
                .is_ok()
        })?;
        let _ = writeln!(lock);
        g
    };
    if args.json {
        let mut v = json!({
            "text": out.text,
            "token_ids": out.token_ids,
            "prompt_tokens": out.prompt_tokens,
            "prompt_token_ids": prompt,
            "completion_tokens": out.token_ids.len(),
            "finish_reason": out.finish_reason.as_str(),
            "prefill_tokens_per_s": out.prefill_tokens_per_s(),
            "decode_tokens_per_s": out.decode_tokens_per_s(),
        });
        if args.logprobs.is_some() {
            v["logprobs"] = out
                .logprobs
                .iter()
                .map(|lp| json!({"token": lp.id, "logprob": lp.logprob, "top": lp.top}))
                .collect();
        }
        println!("{v}");
    } else {
        eprintln!(
            "[prompt: {} tokens, {:.1} tok/s | generated: {} tokens, {:.1} tok/s | finish: {}]",
            out.prompt_tokens,
            out.prefill_tokens_per_s(),
            out.token_ids.len(),
            out.decode_tokens_per_s(),
            out.finish_reason.as_str()
        );
    }
    Ok(())
}
