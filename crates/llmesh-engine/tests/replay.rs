//! A sequence replayed from its prompt and the tokens generated so far — as a cluster does after
//! losing a node — continues exactly as the uninterrupted run, with sampling, penalties and a
//! seed; and a fixed seed gives the same tokens.
#![allow(clippy::unwrap_used)]

mod common;

use llmesh_engine::generate::StepRunner;
use llmesh_engine::{
    Architecture, GenerateRequest, LocalRunner, ModelFiles, SamplingParams, generate,
};

#[test]
fn replayed_equals_uninterrupted() {
    let m = common::arch_model(Architecture::Llama);
    let files = ModelFiles::open(&m.dir).unwrap();
    let shard = files.load_full().unwrap();
    let prompt = common::prompt_ids(files.config().vocab_size, 9);
    let mut req = GenerateRequest::new(prompt.clone(), 40);
    req.sampling = SamplingParams {
        temperature: 1.3,
        top_k: 50,
        top_p: 0.95,
        presence_penalty: 0.5,
        repetition_penalty: 1.1,
        seed: Some(1234),
        ..Default::default()
    };
    let run = || {
        let mut runner = LocalRunner::new(&shard, &req).unwrap();
        generate(&mut runner, files.tokenizer(), &req, &mut |_| true)
            .unwrap()
            .token_ids
    };
    let full = run();
    assert_eq!(full, run(), "a fixed seed gives the same tokens");
    assert_eq!(full.len(), 40);
    for k in [1, 7, 23] {
        let mut spec = req.head_spec();
        spec.generated = full[..k].to_vec();
        let mut runner = LocalRunner::with_head(&shard, &spec).unwrap();
        let mut history = prompt.clone();
        history.extend_from_slice(&full[..k]);
        let mut next = runner.step(&history, true).unwrap().sampled.unwrap().id;
        let mut resumed = full[..k].to_vec();
        while resumed.len() < full.len() {
            resumed.push(next);
            next = runner.step(&[next], true).unwrap().sampled.unwrap().id;
        }
        assert_eq!(resumed, full, "replay after {k} tokens");
    }
}
