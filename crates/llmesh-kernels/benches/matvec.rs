//! Mat-vec (decode) and mat-mat (prompt) throughput per weight type, as effective GB/s of weight
//! bytes read (mat-vec) and GFLOP/s (mat-mat).
#![allow(clippy::unwrap_used)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use llmesh_kernels::{QMatrix, QType};

fn matrix(ty: QType, rows: usize, cols: usize) -> QMatrix {
    // Deterministic bytes with small, finite f16 scales wherever a format keeps them.
    let mut data: Vec<u8> = (0..ty.row_bytes(cols) * rows)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let scale = half::f16::from_f32(0.01).to_le_bytes();
    let (bb, at): (usize, &[usize]) = match ty {
        QType::Q8_0 => (34, &[0]),
        QType::Q4_0 => (18, &[0]),
        QType::Q4K => (144, &[0, 2]),
        QType::Q6K => (210, &[208]),
        QType::F16 => (2, &[0]),
        QType::BF16 | QType::F32 => (1, &[]),
    };
    for b in data.chunks_exact_mut(bb) {
        for &a in at {
            b[a..a + 2].copy_from_slice(&scale);
        }
    }
    if ty == QType::BF16 {
        for c in data.chunks_exact_mut(2) {
            c.copy_from_slice(&half::bf16::from_f32(0.01).to_le_bytes());
        }
    }
    if ty == QType::F32 {
        for c in data.chunks_exact_mut(4) {
            c.copy_from_slice(&0.01f32.to_le_bytes());
        }
    }
    QMatrix::new(ty, rows, cols, data).unwrap()
}

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
