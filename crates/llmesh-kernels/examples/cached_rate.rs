//! The mat-vec kernels' own speed, with the weights already in cache: one core, a matrix small
//! enough for L2, so the figure is the arithmetic's limit, not memory's. Decode is bound by
//! memory only while this rate, times the cores, stays well above the memory bandwidth.
//!
//! `cargo run --release -p llmesh-kernels --example cached_rate -- [types] [rows]`
#![allow(clippy::unwrap_used)]

use std::time::Instant;

use llmesh_kernels::QType;

mod support;
use support::matrix;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let types = args
        .get(1)
        .map_or("Q4_0,Q8_0,Q4_K,Q6_K,F16", String::as_str);
    let rows: usize = args.get(2).map_or(128, |a| a.parse().unwrap());
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build_global()
        .unwrap();
    let k = 2048;
    for name in types.split(',') {
        let ty = *QType::ALL
            .iter()
            .find(|t| t.name().eq_ignore_ascii_case(name))
            .unwrap_or_else(|| panic!("unknown type {name}"));
        let w = matrix(ty, rows, k);
        let x: Vec<f32> = (0..k).map(|i| ((i % 17) as f32 - 8.0) * 0.1).collect();
        let mut y = vec![0f32; rows];
        let mut best = f64::MAX;
        for _ in 0..7 {
            let reps = 2000;
            // On a pool thread, as the engine calls its products (a call from outside the pool
            // waits for a worker to wake up each time).
            let dt = rayon::scope(|_| {
                let t0 = Instant::now();
                for _ in 0..reps {
                    w.matmul(&x, 1, &mut y).unwrap();
                }
                t0.elapsed().as_secs_f64()
            });
            best = best.min(dt / reps as f64);
        }
        let gbs = w.size_in_bytes() as f64 / best / 1e9;
        println!(
            "{name:5} {rows}x{k}: {gbs:5.1} GB/s of weights per core, {:.2} µs per product",
            best * 1e6
        );
    }
}
