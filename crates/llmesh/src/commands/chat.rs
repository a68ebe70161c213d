//! `llmesh chat`: the model's chat template around a conversation, one reply or interactively.

use std::io::{BufRead, Write};

use anyhow::Result;
use llmesh_engine::{GenerateRequest, LocalRunner, Message, generate};

use crate::cli::ChatArgs;

pub fn run(args: ChatArgs) -> Result<()> {
    let (files, shard) = super::load_model(&args.model)?;
    let template = files.chat_template()?;
    let sampling = super::sampling(&args.sampling)?;
    let mut history: Vec<Message> = args
        .system
        .iter()
        .map(|s| Message::new("system", s.clone()))
        .collect();
    let reply = |history: &[Message]| -> Result<String> {
        let text = template.render(history, true)?;
        let prompt = files.tokenizer().encode(&text, false)?;
        let mut req = GenerateRequest::new(prompt, args.sampling.max_tokens);
        req.sampling = sampling.clone();
        req.stop = args.sampling.stop.clone();
        req.stop_ids = files.eos_ids().to_vec();
        let mut runner = LocalRunner::new(&shard, &req)?;
        let mut stdout = std::io::stdout().lock();
        let g = generate(&mut runner, files.tokenizer(), &req, &mut |ev| {
            stdout
                .write_all(ev.text.as_bytes())
                .and_then(|_| stdout.flush())
                .is_ok()
        })?;
        writeln!(stdout)?;
        Ok(g.text)
    };
    if let Some(p) = &args.prompt {
        history.push(Message::new("user", p.clone()));
        reply(&history)?;
        return Ok(());
    }
    eprintln!(
        "Chatting with {} — type a message, an empty line or Ctrl-D to quit.",
        files.name()
    );
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            return Ok(());
        }
        history.push(Message::new("user", line.trim_end().to_string()));
        let text = reply(&history)?;
        history.push(Message::new("assistant", text));
    }
}
