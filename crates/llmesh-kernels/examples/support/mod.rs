//! Shared by the kernel benchmarks and examples: synthetic matrices of each type.

use llmesh_kernels::{QMatrix, QType};

/// A `rows × cols` matrix of `ty` made of deterministic bytes, with small finite scales wherever
/// the format keeps them (so products stay finite).
pub fn matrix(ty: QType, rows: usize, cols: usize) -> QMatrix {
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
