//! Mat-vec (decode) and mat-mat (prompt) throughput per weight type, as effective GB/s of weight
//! bytes read (mat-vec; for the integer types also on the AVX2 kernels, `…/avx2`, which on a CPU
//! without AVX-512 VNNI are the same kernels) and multiply-adds per second (mat-mat).
#![allow(clippy::unwrap_used)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use llmesh_kernels::{Backend, QType};

#[path = "../examples/support/mod.rs"]
mod support;
use support::matrix;

fn matvec(c: &mut Criterion) {
    let (n, k) = (4096, 4096);
    let mut g = c.benchmark_group("matvec_4096x4096");
    for ty in [
        QType::Q4_0,
        QType::Q8_0,
        QType::Q4K,
        QType::Q6K,
        QType::F16,
        QType::BF16,
    ] {
        let w = matrix(ty, n, k);
        let x: Vec<f32> = (0..k).map(|i| ((i % 17) as f32 - 8.0) * 0.1).collect();
        let mut y = vec![0f32; n];
        g.throughput(Throughput::Bytes(w.size_in_bytes() as u64));
        g.bench_function(ty.name(), |b| b.iter(|| w.matmul(&x, 1, &mut y).unwrap()));
        // The AVX2 kernels too, where AVX-512 VNNI ones replace them (integer types).
        if !matches!(ty, QType::F16 | QType::BF16) {
            g.bench_function(format!("{}/avx2", ty.name()), |b| {
                b.iter(|| w.matmul_with(Backend::Avx2, &x, 1, &mut y).unwrap())
            });
        }
    }
    g.finish();
}

fn matmat(c: &mut Criterion) {
    let (n, k, m) = (2048, 2048, 64);
    let mut g = c.benchmark_group("matmat_2048x2048_m64");
    g.sample_size(20);
    for ty in [
        QType::Q4_0,
        QType::Q8_0,
        QType::Q4K,
        QType::Q6K,
        QType::F16,
        QType::BF16,
        QType::F32,
    ] {
        let w = matrix(ty, n, k);
        let x: Vec<f32> = (0..m * k).map(|i| ((i % 13) as f32 - 6.0) * 0.1).collect();
        let mut y = vec![0f32; m * n];
        // Elements = multiply-adds; criterion prints them per second.
        g.throughput(Throughput::Elements((n * k * m) as u64));
        g.bench_function(ty.name(), |b| b.iter(|| w.matmul(&x, m, &mut y).unwrap()));
    }
    g.finish();
}

criterion_group!(benches, matvec, matmat);
criterion_main!(benches);
