//! Times a prompt's processing alone (no sampling, no decode), for profiling the prefill:
//! `cargo run --release -p llmesh-engine --example prefill -- MODEL [tokens] [runs]`.
#![allow(clippy::unwrap_used)]

use std::time::Instant;

use llmesh_engine::{LogitsFor, ModelFiles, ShardInput};

fn main() {
    llmesh_engine::system::keep_freed_memory();
    let args: Vec<String> = std::env::args().collect();
    let Some(model) = args.get(1) else {
        eprintln!("usage: prefill MODEL [tokens] [runs]");
        std::process::exit(2);
    };
    let files = ModelFiles::open(std::path::Path::new(model)).unwrap();
    let n: usize = args.get(2).map_or(128, |a| a.parse().unwrap());
    let runs: usize = args.get(3).map_or(10, |a| a.parse().unwrap()).max(1);
    let shard = files.load_full().unwrap();
    let vocab = files.config().vocab_size;
    let prompt: Vec<u32> = (0..n).map(|i| ((i * 7919 + 11) % vocab) as u32).collect();
    let mut rates = Vec::new();
    for _ in 0..runs {
        let mut cache = shard.new_cache();
        let t0 = Instant::now();
        shard
            .forward(&mut cache, ShardInput::Tokens(&prompt), LogitsFor::Last)
            .unwrap();
        rates.push(n as f64 / t0.elapsed().as_secs_f64());
    }
    rates.sort_by(f64::total_cmp);
    println!(
        "prefill {:.1} tok/s (median of {runs}; min {:.1}, max {:.1})",
        rates[runs / 2],
        rates[0],
        rates[runs - 1]
    );
}
