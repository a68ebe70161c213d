//! Throughput of one transformer layer's products (a 1B Llama: hidden 2048, 8 KV heads of 64,
//! FFN 8192) per weight type, for a given number of activation rows: where a prompt's or a
//! decode step's time goes, shape by shape.
//!
//! `cargo run --release -p llmesh-kernels --example layer_shapes -- [rows] [types] [threads]`
#![allow(clippy::unwrap_used)]

use std::time::Instant;

use llmesh_kernels::{QMatrix, QType};

mod support;
use support::matrix;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let m: usize = args.get(1).map_or(128, |a| a.parse().unwrap());
    let types = args
        .get(2)
        .map_or("F16,Q8_0,Q4_0,Q4_K,Q6_K", String::as_str);
    if let Some(t) = args.get(3) {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t.parse().unwrap())
            .build_global()
            .unwrap();
    }
    let shapes = [
        ("q/o 2048x2048", 2048, 2048),
        ("k/v 512x2048", 512, 2048),
        ("gate/up 8192x2048", 8192, 2048),
        ("down 2048x8192", 2048, 8192),
    ];
    for name in types.split(',') {
        let ty = *QType::ALL
            .iter()
            .find(|t| t.name().eq_ignore_ascii_case(name))
            .unwrap_or_else(|| panic!("unknown type {name}"));
        let mut line = format!("{name:6} m={m:4}:");
        for (label, n, k) in shapes {
            // Enough copies that a mat-vec streams from memory, not from the last-level cache,
            // as in a model.
            let one = matrix(ty, n, k);
            let copies = if m <= 4 {
                (256 << 20) / one.size_in_bytes() + 1
            } else {
                1
            };
            let ws: Vec<QMatrix> = (0..copies).map(|_| one.clone()).collect();
            let x: Vec<f32> = (0..m * k).map(|i| ((i % 17) as f32 - 8.0) * 0.1).collect();
            let mut y = vec![0f32; m * n];
            for w in &ws {
                w.matmul(&x, m, &mut y).unwrap();
            }
            // About 1e10 multiply-adds per prompt shape (a few tenths of a second); 4e9 per
            // mat-vec shape, and every copy at least once.
            let work = if m <= 4 { 4e9 } else { 1e10 };
            let reps = ((work / (m * n * k) as f64).ceil() as usize).max(3 * copies);
            // On a pool thread, as the engine calls its products.
            let dt = rayon::scope(|_| {
                let t0 = Instant::now();
                for i in 0..reps {
                    ws[i % copies].matmul(&x, m, &mut y).unwrap();
                }
                t0.elapsed().as_secs_f64() / reps as f64
            });
            let gmac = (m * n * k) as f64 / dt / 1e9;
            let gbs = one.size_in_bytes() as f64 / dt / 1e9;
            line += &format!("  {label}: {gmac:6.1} GMAC/s {gbs:5.1} GB/s");
        }
        println!("{line}");
    }
}
