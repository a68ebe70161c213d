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
//! sixteen runs of rows 0..8 (128 bytes), then the 6-bit codes rearranged (see [`q6k_xyz`]) as
//! 48 chunks of 4 bytes of rows 0..8 (1536 bytes): the same bits, placed so a kernel unpacks
//! four code vectors from three loads with 11 operations instead of 17.

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
            // From a block whose 192 code bytes are already in the `q6k_xyz` order.
            let mut v = vec![(208, 2 * r, 2)];
            for j in 0..16 {
                v.push((192 + j, 16 + 8 * j + r, 1));
            }
            for t in 0..48 {
                v.push((4 * t, 144 + 32 * t + 4 * r, 4));
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

/// A Q6_K block's 192 code bytes (128 low-bits bytes, then 64 high-bits bytes) in the order the
/// interleaved kernel reads them. Position `l` (0..32) of half `n` has four 6-bit codes, one per
/// quarter `g` (elements `128n + 32g + l`). For each half and run of four positions `c` there
/// are three 4-byte runs, one byte per position:
/// `X = code_g0 | top2(code_g2) << 6`, `Y = code_g1 | top2(code_g3) << 6`,
/// `Z = low4(code_g2) | low4(code_g3) << 4`, at bytes `96n + 12c + 4·{X: 0, Y: 1, Z: 2} + (l % 4)`.
fn q6k_xyz(codes: &[u8]) -> [u8; 192] {
    let (ql, qh) = codes.split_at(128);
    let mut out = [0u8; 192];
    for n in 0..2 {
        for l in 0..32 {
            let code = crate::formats::q6k_codes(&ql[64 * n..], &qh[32 * n..], l);
            let at = 96 * n + 12 * (l / 4) + l % 4;
            out[at] = code[0] | (code[2] >> 4) << 6;
            out[at + 4] = code[1] | (code[3] >> 4) << 6;
            out[at + 8] = (code[2] & 15) | (code[3] & 15) << 4;
        }
    }
    out
}

/// The inverse of [`q6k_xyz`].
fn q6k_plain(xyz: &[u8]) -> [u8; 192] {
    let mut out = [0u8; 192];
    for n in 0..2 {
        for l in 0..32 {
            let at = 96 * n + 12 * (l / 4) + l % 4;
            let (x, y, z) = (xyz[at], xyz[at + 4], xyz[at + 8]);
            let code = [
                x & 63,
                y & 63,
                (z & 15) | (x >> 6) << 4,
                (z >> 4) | (y >> 6) << 4,
            ];
            out[64 * n + l] = (code[0] & 15) | (code[2] & 15) << 4;
            out[64 * n + 32 + l] = (code[1] & 15) | (code[3] & 15) << 4;
            out[128 + 32 * n + l] =
                code[0] >> 4 | (code[1] >> 4) << 2 | (code[2] >> 4) << 4 | (code[3] >> 4) << 6;
        }
    }
    out
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
    // A Q6_K block with its codes in the kernel's order (`q6k_xyz`).
    let mut moved = vec![0u8; bb];
    for b in 0..nb {
        let out = &mut dst[b * 8 * bb..(b + 1) * 8 * bb];
        for (r, sp) in spans.iter().enumerate() {
            let mut blk = &src[r * row_bytes + b * bb..r * row_bytes + (b + 1) * bb];
            if ty == QType::Q6K {
                moved.copy_from_slice(blk);
                moved[..192].copy_from_slice(&q6k_xyz(&blk[..192]));
                blk = &moved;
            }
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
        if ty == QType::Q6K {
            let plain = q6k_plain(&blk[..192]);
            blk[..192].copy_from_slice(&plain);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_groups_unpack_to_the_rows() {
        for ty in QType::ALL.into_iter().filter(|&t| interleaves(t)) {
            let row_bytes = ty.row_bytes(2 * ty.block_elems().max(16));
            let src: Vec<u8> = (0..8 * row_bytes)
                .map(|i| (i.wrapping_mul(2654435761) >> 7) as u8)
                .collect();
            let mut dst = vec![0u8; src.len()];
            pack8(ty, &src, row_bytes, &mut dst);
            assert_ne!(dst, src, "{ty}: packing moved nothing");
            for r in 0..8 {
                let row = &src[r * row_bytes..(r + 1) * row_bytes];
                assert_eq!(unpack_row(ty, &dst, row_bytes, r), row, "{ty} row {r}");
            }
        }
    }

    #[test]
    fn q6k_codes_rearrange_without_loss() {
        let codes: Vec<u8> = (0..192u32).map(|i| (i * 37 + 11) as u8).collect();
        let xyz = q6k_xyz(&codes);
        assert_eq!(q6k_plain(&xyz).as_slice(), codes.as_slice());
        // Element 32g + l of half n is code g of position l: check one by the format's rule.
        let (n, l) = (1, 13);
        let (a, h) = (codes[64 * n + l], codes[128 + 32 * n + l]);
        let code_g2 = (a >> 4) | (h >> 4 & 3) << 4;
        let at = 96 * n + 12 * (l / 4) + l % 4;
        assert_eq!((xyz[at + 8] & 15) | (xyz[at] >> 6) << 4, code_g2);
    }
}
