//! Every kernel against the dequantise-then-f32 reference, on odd shapes, on every backend.
#![allow(clippy::unwrap_used)]

use half::{bf16, f16};
use llmesh_kernels::{Backend, KernelError, QMatrix, QType};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Random but valid stored bytes for a `rows × cols` matrix: scales of a realistic size, codes
/// uniformly random.
fn random_matrix(ty: QType, rows: usize, cols: usize, rng: &mut ChaCha8Rng) -> QMatrix {
    let mut data = Vec::with_capacity(ty.row_bytes(cols) * rows);
    let h = |v: f32| f16::from_f32(v).to_le_bytes();
    for _ in 0..rows * cols / ty.block_elems() {
        match ty {
            QType::F32 => data.extend_from_slice(&rng.random_range(-1.0f32..1.0).to_le_bytes()),
            QType::F16 => data.extend_from_slice(&h(rng.random_range(-1.0..1.0))),
            QType::BF16 => {
                data.extend_from_slice(&bf16::from_f32(rng.random_range(-1.0..1.0)).to_le_bytes())
            }
            QType::Q8_0 => {
                data.extend_from_slice(&h(rng.random_range(0.001..0.01)));
                data.extend((0..32).map(|_| rng.random_range(-127i8..=127) as u8));
            }
            QType::Q4_0 => {
                data.extend_from_slice(&h(rng.random_range(0.01..0.1)));
                data.extend((0..16).map(|_| rng.random::<u8>()));
            }
            QType::Q4K => {
                data.extend_from_slice(&h(rng.random_range(0.0005..0.002)));
                data.extend_from_slice(&h(rng.random_range(0.0005..0.002)));
                data.extend((0..140).map(|_| rng.random::<u8>()));
            }
            QType::Q6K => {
                data.extend((0..192).map(|_| rng.random::<u8>()));
                data.extend((0..16).map(|_| rng.random_range(-127i8..=127) as u8));
                data.extend_from_slice(&h(rng.random_range(0.0001..0.001)));
            }
        }
    }
    QMatrix::new(ty, rows, cols, data).unwrap()
}

/// Checks `x Wᵀ` against the f64 product of the dequantised matrix, elementwise within
/// `tol × Σ|w x|` (the scale of the terms, which is what 8-bit activations' rounding follows).
fn check(ty: QType, rows: usize, cols: usize, m: usize, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let w = random_matrix(ty, rows, cols, &mut rng);
    let x: Vec<f32> = (0..m * cols).map(|_| rng.random_range(-2.0..2.0)).collect();
    let wf = w.dequantize();
    let tol = match ty {
        QType::F32 | QType::F16 | QType::BF16 => 1e-5,
        _ => 1.5e-2,
    };
    let mut yp = vec![f32::NAN; m * rows];
    w.matmul_with(Backend::Portable, &x, m, &mut yp).unwrap();
    // The fastest kernels here, and on x86-64 with AVX-512 also the AVX2 ones.
    for backend in [Backend::Auto, Backend::Avx2] {
        let mut y = vec![f32::NAN; m * rows];
        w.matmul_with(backend, &x, m, &mut y).unwrap();
        for i in 0..m {
            for j in 0..rows {
                let (mut exact, mut scale) = (0f64, 0f64);
                for c in 0..cols {
                    let t = f64::from(wf[j * cols + c]) * f64::from(x[i * cols + c]);
                    exact += t;
                    scale += t.abs();
                }
                let got = f64::from(y[i * rows + j]);
                let port = f64::from(yp[i * rows + j]);
                assert!(
                    (got - exact).abs() <= tol * scale + 1e-6,
                    "{ty} {rows}x{cols} m={m} {backend:?} at ({i},{j}): got {got}, reference \
                     {exact} (scale {scale})"
                );
                // Every backend does the same integer arithmetic; only float summation order
                // differs.
                assert!(
                    (got - port).abs() <= 1e-4 * scale + 1e-6,
                    "{ty} {rows}x{cols} m={m} {backend:?} at ({i},{j}): SIMD {got}, portable {port}"
                );
            }
        }
    }
}

#[test]
fn every_type_matches_the_reference_on_odd_shapes() {
    for (n, ty) in QType::ALL.into_iter().enumerate() {
        let b = ty.block_elems().max(16);
        // One block, a few blocks; rows not a multiple of 4 or of a task; prompts of 1, 3, 5
        // and 37 rows (past one activation tile).
        for (s, &(rows, blocks, m)) in [
            (1, 1, 1),
            (7, 3, 1),
            (13, 2, 3),
            (33, 5, 5),
            (70, 2, 37),
            (5, 9, 4),
        ]
        .iter()
        .enumerate()
        {
            check(ty, rows, blocks * b, m, (n * 100 + s) as u64);
        }
    }
}

#[test]
fn float_types_take_any_width() {
    for ty in [QType::F32, QType::F16, QType::BF16] {
        for cols in [1, 7, 19, 33, 100] {
            check(ty, 9, cols, 3, cols as u64);
        }
    }
}

#[test]
fn half_precision_prompts_over_several_column_panels() {
    // Rows of 4,128 columns are widened in three panels (2,048, 2,048 and 32 columns), whose
    // partial sums add up; on one thread, 40 rows are tasks of 16, 16 and 8 rows (two 16-row
    // panels and one 8-row group); prompts of 4 to 11 rows end in activation tiles of every
    // size from 3 to 6 (7 = 4 + 3, 8 = 4 + 4, 9 = 5 + 4, 10 = 6 + 4, 11 = 6 + 5).
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    one.install(|| {
        for ty in [QType::F16, QType::BF16] {
            for m in 4..=11 {
                check(ty, 40, 4128, m, 20 + m as u64);
            }
        }
    });
}

#[test]
fn products_sharing_an_input_equal_separate_products() {
    let mut rng = ChaCha8Rng::seed_from_u64(31);
    // A Q4_K_M layer's q, k, v (v in Q6_K), an F16 gate/up pair, mixed 32-blocks.
    let sets: [&[(QType, usize)]; 3] = [
        &[(QType::Q4K, 72), (QType::Q4K, 24), (QType::Q6K, 24)],
        &[(QType::F16, 96), (QType::F16, 96)],
        &[(QType::Q4_0, 40), (QType::Q8_0, 9), (QType::F32, 3)],
    ];
    for set in sets {
        let cols = 512;
        let ws: Vec<QMatrix> = set
            .iter()
            .map(|&(ty, rows)| random_matrix(ty, rows, cols, &mut rng))
            .collect();
        for m in [1, 5, 13] {
            let x: Vec<f32> = (0..m * cols).map(|_| rng.random_range(-2.0..2.0)).collect();
            let mut fused: Vec<Vec<f32>> =
                ws.iter().map(|w| vec![f32::NAN; m * w.rows()]).collect();
            let refs: Vec<&QMatrix> = ws.iter().collect();
            let mut outs: Vec<&mut [f32]> = fused.iter_mut().map(|v| v.as_mut_slice()).collect();
            QMatrix::matmul_many(&refs, &x, m, &mut outs).unwrap();
            for (w, got) in ws.iter().zip(&fused) {
                let mut want = vec![0f32; m * w.rows()];
                w.matmul(&x, m, &mut want).unwrap();
                // Same kernels on the same quantised activations: equal, except that the split
                // of rows into tasks decides which f16 rows take the 16-row panel path, whose
                // float sums run in another order (terms here are at most 2 in size).
                let tol = match w.qtype() {
                    QType::F16 | QType::BF16 => 1e-6 * cols as f32,
                    _ => 0.0,
                };
                for (g, e) in got.iter().zip(&want) {
                    assert!((g - e).abs() <= tol, "{} m={m}: {g} vs {e}", w.qtype());
                }
            }
        }
    }
    // Operands that do not fit are errors.
    let a = random_matrix(QType::Q8_0, 8, 64, &mut rng);
    let b = random_matrix(QType::Q8_0, 8, 96, &mut rng);
    let x = vec![0f32; 64];
    let (mut ya, mut yb) = (vec![0f32; 8], vec![0f32; 8]);
    assert!(QMatrix::matmul_many(&[&a, &b], &x, 1, &mut [&mut ya, &mut yb]).is_err());
    assert!(QMatrix::matmul_many(&[&a], &x, 1, &mut [&mut ya, &mut yb]).is_err());
}

#[test]
fn a_large_matrix_on_many_threads_matches() {
    check(QType::Q4K, 300, 1024, 2, 7);
    check(QType::Q8_0, 257, 512, 1, 8);
    // Tasks of 40 rows: pairs of 8-row groups, a single group and plain rows, for prompts of
    // 9 rows (two 4-row tiles and one more) and for one row.
    for ty in [QType::F16, QType::BF16, QType::Q4_0] {
        check(ty, 300, 96, 9, 9);
        check(ty, 300, 64, 1, 10);
    }
}

#[test]
fn a_decode_step_gives_the_same_bits_on_any_number_of_threads() {
    // A mat-vec reads its groups of eight rows as two streams, in chunks of columns; how the
    // rows fall into tasks and streams changes with the thread count, a row's result must not.
    // 301 rows: 37 groups and 5 plain rows; 1,280 columns: chunks that do not divide it.
    let mut rng = ChaCha8Rng::seed_from_u64(41);
    for ty in QType::ALL {
        let cols = 1280;
        let w = random_matrix(ty, 301, cols, &mut rng);
        let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-2.0..2.0)).collect();
        for backend in [Backend::Auto, Backend::Avx2] {
            let on = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut y = vec![f32::NAN; 301];
                pool.install(|| w.matmul_with(backend, &x, 1, &mut y))
                    .unwrap();
                y
            };
            let one = on(1);
            for threads in [2, 3, 5] {
                let y = on(threads);
                let same = one.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{ty} {backend:?}: {threads} threads differ from one");
            }
        }
    }
    for ty in QType::ALL {
        check(ty, 301, 1280, 1, 42);
    }
}

#[test]
fn bad_shapes_are_errors_not_panics() {
    let e = QMatrix::new(QType::Q4_0, 2, 48, vec![0; 36]).unwrap_err();
    assert!(matches!(e, KernelError::Blocks { block: 32, .. }), "{e}");
    let e = QMatrix::new(QType::Q8_0, 2, 64, vec![0; 10]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "a Q8_0 matrix of 2×64 takes 136 bytes, got 10"
    );
    let w = QMatrix::new(QType::F16, 2, 4, vec![0; 16]).unwrap();
    let mut y = vec![0f32; 2];
    assert!(w.matmul(&[0.0; 5], 1, &mut y).is_err());
    assert!(w.matmul(&[0.0; 4], 1, &mut y[..1]).is_err());
}

#[test]
fn zero_and_non_finite_activations() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let w = random_matrix(QType::Q8_0, 4, 64, &mut rng);
    let mut y = vec![1f32; 4];
    w.matmul(&[0.0; 64], 1, &mut y).unwrap();
    assert!(y.iter().all(|&v| v == 0.0), "{y:?}");
    let mut x = vec![0.5f32; 64];
    x[3] = f32::NAN;
    w.matmul(&x, 1, &mut y).unwrap();
    assert!(
        y.iter().all(|v| v.is_nan()),
        "NaN must propagate, not vanish: {y:?}"
    );
}
