//! The storage types the kernels multiply, with ggml's block layouts (as in GGUF files), and the
//! reference dequantisation every kernel is tested against.

use half::{bf16, f16};

/// A weight storage type with a kernel in this crate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QType {
    /// 32-bit floats.
    F32,
    /// IEEE half floats.
    F16,
    /// bfloat16.
    BF16,
    /// Blocks of 32: an f16 scale and 32 signed 8-bit values.
    Q8_0,
    /// Blocks of 32: an f16 scale and 32 4-bit values with an offset of 8.
    Q4_0,
    /// Super-blocks of 256: f16 scale and min, eight 6-bit sub-scales and mins, 4-bit values.
    Q4K,
    /// Super-blocks of 256: 6-bit values (low 4 bits and high 2 bits apart), sixteen 8-bit
    /// sub-scales, an f16 scale.
    Q6K,
}

impl QType {
    /// Elements per block.
    pub const fn block_elems(self) -> usize {
        match self {
            QType::F32 | QType::F16 | QType::BF16 => 1,
            QType::Q8_0 | QType::Q4_0 => 32,
            QType::Q4K | QType::Q6K => 256,
        }
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        match self {
            QType::F32 => 4,
            QType::F16 | QType::BF16 => 2,
            QType::Q8_0 => 34,
            QType::Q4_0 => 18,
            QType::Q4K => 144,
            QType::Q6K => 210,
        }
    }

    /// Bytes of a row of `cols` elements (`cols` a multiple of the block size).
    pub const fn row_bytes(self, cols: usize) -> usize {
        cols / self.block_elems() * self.block_bytes()
    }

    /// The name llama.cpp uses.
    pub const fn name(self) -> &'static str {
        match self {
            QType::F32 => "F32",
            QType::F16 => "F16",
            QType::BF16 => "BF16",
            QType::Q8_0 => "Q8_0",
            QType::Q4_0 => "Q4_0",
            QType::Q4K => "Q4_K",
            QType::Q6K => "Q6_K",
        }
    }

    /// Every type with a kernel.
    pub const ALL: [QType; 7] = [
        QType::F32,
        QType::F16,
        QType::BF16,
        QType::Q8_0,
        QType::Q4_0,
        QType::Q4K,
        QType::Q6K,
    ];
}

impl std::fmt::Display for QType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[inline]
pub(crate) fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The four unsigned 6-bit codes (0..64, offset by 32) at position `l` (0..32) of a Q6_K half
/// super-block, one per quarter (elements `l`, `l + 32`, `l + 64`, `l + 96` of the half), from
/// the half's 64 low-bits bytes `ql` and 32 high-bits bytes `qh`.
#[inline]
pub(crate) fn q6k_codes(ql: &[u8], qh: &[u8], l: usize) -> [u8; 4] {
    let (a, b, h) = (ql[l], ql[l + 32], qh[l]);
    [
        (a & 0x0f) | (h & 3) << 4,
        (b & 0x0f) | (h >> 2 & 3) << 4,
        (a >> 4) | (h >> 4 & 3) << 4,
        (b >> 4) | (h >> 6 & 3) << 4,
    ]
}

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K super-block's 12 scale bytes.
#[inline]
pub(crate) fn q4k_scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Widens one row of `cols` elements stored as `ty` into `out`.
pub fn dequantize_row(ty: QType, row: &[u8], out: &mut [f32]) {
    let bb = ty.block_bytes();
    match ty {
        QType::F32 => {
            for (o, c) in out.iter_mut().zip(row.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        QType::F16 => {
            for (o, c) in out.iter_mut().zip(row.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        QType::BF16 => {
            for (o, c) in out.iter_mut().zip(row.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        QType::Q8_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(row.chunks_exact(bb)) {
                let d = half_at(b, 0);
                for (o, &q) in o.iter_mut().zip(&b[2..34]) {
                    *o = d * f32::from(q as i8);
                }
            }
        }
        QType::Q4_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(row.chunks_exact(bb)) {
                let d = half_at(b, 0);
                for (i, &q) in b[2..18].iter().enumerate() {
                    o[i] = d * (f32::from(q & 0x0f) - 8.0);
                    o[i + 16] = d * (f32::from(q >> 4) - 8.0);
                }
            }
        }
        QType::Q4K => {
            for (o, b) in out.chunks_exact_mut(256).zip(row.chunks_exact(bb)) {
                let d = half_at(b, 0);
                let dmin = half_at(b, 2);
                let scales = &b[4..16];
                let qs = &b[16..144];
                for c in 0..4 {
                    let (s1, m1) = q4k_scale_min(2 * c, scales);
                    let (s2, m2) = q4k_scale_min(2 * c + 1, scales);
                    let (d1, m1) = (d * f32::from(s1), dmin * f32::from(m1));
                    let (d2, m2) = (d * f32::from(s2), dmin * f32::from(m2));
                    for l in 0..32 {
                        let q = qs[32 * c + l];
                        o[64 * c + l] = d1 * f32::from(q & 0x0f) - m1;
                        o[64 * c + 32 + l] = d2 * f32::from(q >> 4) - m2;
                    }
                }
            }
        }
        QType::Q6K => {
            for (o, b) in out.chunks_exact_mut(256).zip(row.chunks_exact(bb)) {
                let d = half_at(b, 208);
                for half in 0..2 {
                    let ql = &b[64 * half..64 * half + 64];
                    let qh = &b[128 + 32 * half..128 + 32 * half + 32];
                    let sc = &b[192 + 8 * half..192 + 8 * half + 8];
                    let o = &mut o[128 * half..128 * half + 128];
                    for l in 0..32 {
                        let is = l / 16;
                        for (g, code) in q6k_codes(ql, qh, l).into_iter().enumerate() {
                            let scale = d * f32::from(sc[is + 2 * g] as i8);
                            o[l + 32 * g] = scale * (i32::from(code) - 32) as f32;
                        }
                    }
                }
            }
        }
    }
}
