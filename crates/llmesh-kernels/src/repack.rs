//! Interleaved layouts: eight rows of Q4_0 or Q8_0 blocks stored together so one 256-bit load
//! holds four codes of each of the eight rows, and the eight rows' scales of a block sit side by
//! side. A kernel then produces eight rows' results in the eight lanes of one register, with no
//! horizontal sums and one scale multiply per block for all eight rows (llama.cpp's CPU backend
//! repacks the same way). The bytes are the file's bytes reordered: the size does not change.
//!
//! Per block column `b` of a group of eight rows (Q4_0, Q8_0): the eight f16 scales (16 bytes),
//! then for each 4-byte chunk `c` of the block's codes, that chunk of rows 0..8 (32 bytes).
//! Per super-block column of Q4_K: the eight `d` (16 bytes), the eight `dmin` (16 bytes), the
//! twelve scale bytes as three 4-byte chunks of rows 0..8 (96 bytes), then the 128 code bytes
//! as 32 chunks of 4 bytes of rows 0..8 (1024 bytes).
//! Per super-block column of Q6_K: the eight `d` (16 bytes), the sixteen 8-bit sub-scales as
//! sixteen runs of rows 0..8 (128 bytes), the 128 low-bits bytes as 32 chunks of 4 bytes of rows
//! 0..8 (1024 bytes), then the 64 high-bits bytes likewise as 16 chunks (512 bytes).

use crate::formats::QType;

/// Whether `ty` has an interleaved layout.
pub(crate) fn interleaves(ty: QType) -> bool {
    matches!(
        ty,
        QType::Q4_0 | QType::Q8_0 | QType::Q4K | QType::Q6K | QType::F16 | QType::BF16
    )
}

/// Where the bytes of one row's block go in an interleaved block column: `(from, to, len)`
/// spans for row `r`.
fn spans(ty: QType, r: usize) -> Vec<(usize, usize, usize)> {
    match ty {
        QType::Q4K => {
            let mut v = vec![(0, 2 * r, 2), (2, 16 + 2 * r, 2)];
            for c in 0..3 {
                v.push((4 + 4 * c, 32 + 32 * c + 4 * r, 4));
            }
            for q in 0..32 {
                v.push((16 + 4 * q, 128 + 32 * q + 4 * r, 4));
            }
            v
        }
        QType::Q6K => {
            let mut v = vec![(208, 2 * r, 2)];
            for j in 0..16 {
                v.push((192 + j, 16 + 8 * j + r, 1));
            }
            for q in 0..32 {
                v.push((4 * q, 144 + 32 * q + 4 * r, 4));
            }
            for q in 0..16 {
                v.push((128 + 4 * q, 1168 + 32 * q + 4 * r, 4));
            }
            v
        }
        QType::F16 | QType::BF16 => vec![(0, 2 * r, 2)],
        _ => {
            let mut v = vec![(0, 2 * r, 2)];
            for c in 0..code_bytes(ty) / 4 {
                v.push((2 + 4 * c, 16 + 32 * c + 4 * r, 4));
            }
            v
        }
    }
}

/// Code bytes per block (after the f16 scale).
fn code_bytes(ty: QType) -> usize {
    ty.block_bytes() - 2
}

/// Writes eight plain rows (`src`, each `row_bytes` long) into `dst` in the interleaved layout.
pub(crate) fn pack8(ty: QType, src: &[u8], row_bytes: usize, dst: &mut [u8]) {
    if matches!(ty, QType::F16 | QType::BF16) {
        // Element k of rows 0..8 side by side (a transpose of 8 × k two-byte values).
        for (k, out) in dst.chunks_exact_mut(16).enumerate() {
            for r in 0..8 {
                let at = r * row_bytes + 2 * k;
                out[2 * r..2 * r + 2].copy_from_slice(&src[at..at + 2]);
            }
        }
        return;
    }
    let bb = ty.block_bytes();
    let nb = row_bytes / bb;
    let spans: Vec<_> = (0..8).map(|r| spans(ty, r)).collect();
    for b in 0..nb {
        let out = &mut dst[b * 8 * bb..(b + 1) * 8 * bb];
        for (r, sp) in spans.iter().enumerate() {
            let blk = &src[r * row_bytes + b * bb..r * row_bytes + (b + 1) * bb];
            for &(from, to, len) in sp {
                out[to..to + len].copy_from_slice(&blk[from..from + len]);
            }
        }
    }
}

/// Row `r` (0..8) of an interleaved group, in the plain layout.
pub(crate) fn unpack_row(ty: QType, group: &[u8], row_bytes: usize, r: usize) -> Vec<u8> {
    let bb = ty.block_bytes();
    let nb = row_bytes / bb;
    let sp = spans(ty, r);
    let mut out = vec![0u8; row_bytes];
    for b in 0..nb {
        let g = &group[b * 8 * bb..(b + 1) * 8 * bb];
        let blk = &mut out[b * bb..(b + 1) * bb];
        for &(from, to, len) in &sp {
            blk[from..from + len].copy_from_slice(&g[to..to + len]);
        }
    }
    out
}
