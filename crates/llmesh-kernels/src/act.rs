//! Activations in the form each weight type's kernel consumes. As in llama.cpp, activations are
//! quantised to 8 bits per row before a quantized product, so the inner loops are integer dot
//! products: blocks of 32 with one scale each for Q8_0 and Q4_0 weights, super-blocks of 256
//! with one scale and sixteen partial sums for the k-quants.

use crate::formats::QType;

/// Which activation form a weight type uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ActKind {
    /// The f32 values as given.
    F32,
    /// 8-bit blocks of 32, an f32 scale per block.
    Q8,
    /// 8-bit super-blocks of 256, an f32 scale per super-block, sums of each 16 values.
    Q8K,
}

impl ActKind {
    pub(crate) fn of(ty: QType) -> Self {
        match ty {
            QType::F32 | QType::F16 | QType::BF16 => ActKind::F32,
            QType::Q8_0 | QType::Q4_0 => ActKind::Q8,
            QType::Q4K | QType::Q6K => ActKind::Q8K,
        }
    }
}

/// `m` rows of `k` activations, quantised for one weight type.
pub(crate) struct Acts<'a> {
    pub k: usize,
    /// The f32 values (always kept: the f32 kernels read them).
    pub f: &'a [f32],
    /// 8-bit values, `m * k`.
    pub q: Vec<i8>,
    /// Scales: per 32 values (Q8) or per 256 (Q8K).
    pub d: Vec<f32>,
    /// Sums of each 16 quantised values (Q8K only).
    pub bsums: Vec<i16>,
    /// Sums of each block's 32 quantised values (Q4_0 and Q8_0 on x86-64).
    pub sums: Vec<i32>,
    /// Half-precision prompts on SIMD: the rows in the tiles of [`pack_tiles`], each tile
    /// stored column by column (`k` runs of its rows' values) from its first row's offset
    /// (`start * k`), so a kernel reads the values it broadcasts from one stream. Empty
    /// otherwise.
    pub packed: Vec<f32>,
}

/// Activation rows per packed tile (see [`Acts::packed`]).
pub(crate) const PACK_ROWS: usize = 6;

/// The tiles `(first row, rows)` that `m` packed activation rows are cut into: [`PACK_ROWS`]
/// each, except that a remainder of fewer than four rows is merged with the tile before it and
/// the two split evenly (4 + 3, 4 + 4, 5 + 4), since a tile of one or two rows keeps too few
/// multiply-adds in flight to hide their latency.
pub(crate) fn pack_tiles(m: usize) -> Vec<(usize, usize)> {
    let rem = m % PACK_ROWS;
    let (full, tail) = match rem {
        0 => (m / PACK_ROWS, vec![]),
        1..=3 if m > PACK_ROWS => (
            m / PACK_ROWS - 1,
            vec![(PACK_ROWS + rem).div_ceil(2), (PACK_ROWS + rem) / 2],
        ),
        _ => (m / PACK_ROWS, vec![rem]),
    };
    let mut start = 0;
    std::iter::repeat_n(PACK_ROWS, full)
        .chain(tail)
        .map(|rows| {
            start += rows;
            (start - rows, rows)
        })
        .collect()
}

/// Whether a product of `m` rows of type `ty` reads packed activations.
pub(crate) fn packs(ty: QType, m: usize, simd: bool) -> bool {
    cfg!(target_arch = "x86_64") && simd && m >= 4 && matches!(ty, QType::F16 | QType::BF16)
}

/// One activation row's parts.
#[derive(Clone, Copy)]
pub(crate) struct ActRow<'a> {
    pub f: &'a [f32],
    pub q: &'a [i8],
    pub d: &'a [f32],
    pub bsums: &'a [i16],
    /// Only the interleaved x86 Q4_0 and Q8_0 kernels read these.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub sums: &'a [i32],
}

impl<'a> ActRow<'a> {
    /// Columns `cols` (whole blocks of its kind) of this row; of `Acts`' values taken as one
    /// long row, columns `i * k..(i + 1) * k` are row `i`.
    #[inline]
    pub(crate) fn cols(&self, cols: std::ops::Range<usize>) -> ActRow<'a> {
        let part = |len: usize, block: usize| {
            if len == 0 {
                0..0
            } else {
                cols.start / block..cols.end / block
            }
        };
        let dblock = if self.bsums.is_empty() { 32 } else { 256 };
        ActRow {
            f: &self.f[cols.clone()],
            q: if self.q.is_empty() {
                &[]
            } else {
                &self.q[cols.clone()]
            },
            d: &self.d[part(self.d.len(), dblock)],
            bsums: &self.bsums[part(self.bsums.len(), 16)],
            sums: &self.sums[part(self.sums.len(), 32)],
        }
    }
}

impl<'a> Acts<'a> {
    /// Quantises `x` (`m` rows of `k`) for weights of type `ty`, with SIMD if `simd`.
    pub(crate) fn new(ty: QType, x: &'a [f32], k: usize, simd: bool) -> Self {
        let mut a = Acts {
            k,
            f: x,
            q: Vec::new(),
            d: Vec::new(),
            bsums: Vec::new(),
            sums: Vec::new(),
            packed: Vec::new(),
        };
        match ActKind::of(ty) {
            ActKind::F32 if packs(ty, x.len() / k.max(1), simd) => a.packed = pack(x, k),
            ActKind::F32 => {}
            ActKind::Q8 => {
                a.q = vec![0; x.len()];
                a.d = vec![0.0; x.len() / 32];
                // The interleaved x86 kernels take a code offset off with the block sums: Q4_0's
                // 8 and, with AVX-512 VNNI, Q8_0's 128 (its codes made unsigned).
                if cfg!(target_arch = "x86_64") {
                    a.sums = vec![0; x.len() / 32];
                }
                quantize_blocks(x, &mut a.q, &mut a.d, 32, Sums::Of32(&mut a.sums), simd);
            }
            ActKind::Q8K => {
                a.q = vec![0; x.len()];
                a.d = vec![0.0; x.len() / 256];
                a.bsums = vec![0; x.len() / 16];
                quantize_blocks(x, &mut a.q, &mut a.d, 256, Sums::Of16(&mut a.bsums), simd);
            }
        }
        a
    }

    /// Row `i`.
    #[inline]
    pub(crate) fn row(&self, i: usize) -> ActRow<'_> {
        let all = ActRow {
            f: self.f,
            q: &self.q,
            d: &self.d,
            bsums: &self.bsums,
            sums: &self.sums,
        };
        all.cols(i * self.k..(i + 1) * self.k)
    }
}

/// `x` (rows of `k`) in the tiles of [`pack_tiles`], each tile column by column; tiles are
/// shared between the compute threads.
fn pack(x: &[f32], k: usize) -> Vec<f32> {
    use rayon::prelude::*;
    let mut out = vec![0f32; x.len()];
    let mut jobs = Vec::new();
    let mut rest = out.as_mut_slice();
    for (start, rows) in pack_tiles(x.len() / k.max(1)) {
        let (dst, tail) = std::mem::take(&mut rest).split_at_mut(rows * k);
        rest = tail;
        jobs.push((dst, &x[start * k..(start + rows) * k]));
    }
    jobs.into_par_iter().for_each(|(dst, tile)| {
        let rows = tile.len() / k;
        // Column by column: the writes run in order, the reads in `rows` streams.
        for (c, column) in dst.chunks_exact_mut(rows).enumerate() {
            for (r, v) in column.iter_mut().enumerate() {
                *v = tile[r * k + c];
            }
        }
    });
    out
}

/// Sums of the quantised values to compute alongside them (an empty slice: none).
enum Sums<'s> {
    Of32(&'s mut [i32]),
    Of16(&'s mut [i16]),
}

/// Quantises `x` into `q` in blocks of `block` values with one scale each into `d`, and the
/// sums asked for; a prompt's rows are shared between the compute threads.
fn quantize_blocks(
    x: &[f32],
    q: &mut [i8],
    d: &mut [f32],
    block: usize,
    sums: Sums<'_>,
    simd: bool,
) {
    use rayon::prelude::*;
    // About 64 Ki values per task: large enough that handing it to another thread pays.
    let per = (65536 / block).max(1);
    let n = per * block;
    let task = |x: &[f32], q: &mut [i8], d: &mut [f32]| {
        for ((xb, qb), d) in x
            .chunks_exact(block)
            .zip(q.chunks_exact_mut(block))
            .zip(d.iter_mut())
        {
            *d = quantize_block(xb, qb, simd);
        }
    };
    let parts = x
        .par_chunks(n)
        .zip(q.par_chunks_mut(n))
        .zip(d.par_chunks_mut(per));
    match sums {
        Sums::Of32(s) if !s.is_empty() => parts.zip(s.par_chunks_mut(n / 32)).for_each(|(p, s)| {
            let ((x, q), d) = p;
            task(x, q, d);
            block_sums(q, s);
        }),
        Sums::Of16(s) if !s.is_empty() => parts.zip(s.par_chunks_mut(n / 16)).for_each(|(p, s)| {
            let ((x, q), d) = p;
            task(x, q, d);
            block_sums(q, s);
        }),
        _ => parts.for_each(|((x, q), d)| task(x, q, d)),
    }
}

/// The sum of each run of `q.len() / s.len()` quantised values, into `s`.
fn block_sums<T: From<i8> + std::iter::Sum>(q: &[i8], s: &mut [T]) {
    let width = q.len() / s.len().max(1);
    for (s, qb) in s.iter_mut().zip(q.chunks_exact(width.max(1))) {
        *s = qb.iter().map(|&v| T::from(v)).sum();
    }
}

/// Quantises `x` to `q` with one scale (round to nearest, ties to even); returns the scale.
fn quantize_block(x: &[f32], q: &mut [i8], simd: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd && x.len().is_multiple_of(32) {
        // SAFETY: `simd` holds only where x86::available() confirmed the CPU features; the
        // lengths are multiples of 32.
        return unsafe {
            match crate::x86::abs_max(x) {
                None => nan_block(q),
                Some(0.0) => {
                    q.fill(0);
                    0.0
                }
                Some(amax) => {
                    let d = amax / 127.0;
                    crate::x86::quantize_with_scale(x, q, d);
                    d
                }
            }
        };
    }
    let _ = simd;
    let (mut amax, mut finite) = (0f32, true);
    for v in x {
        finite &= v.is_finite();
        amax = amax.max(v.abs());
    }
    if !finite {
        return nan_block(q);
    }
    if amax == 0.0 {
        q.fill(0);
        return 0.0;
    }
    let d = amax / 127.0;
    let id = 1.0 / d;
    for (q, &v) in q.iter_mut().zip(x) {
        *q = (v * id).round_ties_even() as i8;
    }
    d
}

/// A block with a value that is not finite: a NaN scale makes every product with it NaN, as the
/// f32 product would be.
fn nan_block(q: &mut [i8]) -> f32 {
    q.fill(0);
    f32::NAN
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tiles cover every row once, in order, and none has fewer than three rows unless
    /// the whole product has.
    #[test]
    fn pack_tiles_cover_rows_in_order() {
        for m in 1..200 {
            let tiles = pack_tiles(m);
            let mut next = 0;
            for &(start, rows) in &tiles {
                assert_eq!(start, next, "m = {m}");
                assert!((1..=PACK_ROWS).contains(&rows), "m = {m}: {tiles:?}");
                assert!(rows >= 3 || m < PACK_ROWS, "m = {m}: {tiles:?}");
                next += rows;
            }
            assert_eq!(next, m);
        }
    }

    /// The SIMD quantiser gives exactly the scalar one's codes and scales, ties included.
    #[test]
    fn simd_quantisation_equals_scalar() {
        #[cfg(target_arch = "x86_64")]
        if crate::x86::available() {
            let mut x: Vec<f32> = (0..4096)
                .map(|i| ((i as f32 * 0.37).sin() * 3.0) * (1 + i % 7) as f32)
                .collect();
            // A block whose values fall exactly halfway between codes (amax 127: d = 1).
            for (i, v) in x[256..288].iter_mut().enumerate() {
                *v = i as f32 - 16.5;
            }
            x[256] = 127.0;
            x[512..544].fill(0.0);
            x[1024] = f32::NAN;
            x[2048] = f32::INFINITY;
            x[3000] = f32::NEG_INFINITY;
            for (ty, block) in [(QType::Q4_0, 32), (QType::Q4K, 256)] {
                let a = Acts::new(ty, &x, 1024, true);
                let b = Acts::new(ty, &x, 1024, false);
                assert_eq!(a.q, b.q, "{ty:?}");
                assert_eq!(a.sums, b.sums, "{ty:?}");
                assert_eq!(a.bsums, b.bsums, "{ty:?}");
                assert_eq!(a.d.len(), x.len() / block);
                for (i, (p, q)) in a.d.iter().zip(&b.d).enumerate() {
                    assert!(
                        p.to_bits() == q.to_bits() || (p.is_nan() && q.is_nan()),
                        "{i}"
                    );
                }
                assert!(a.d.iter().any(|d| d.is_nan()) && a.d.contains(&0.0) == (block == 32));
            }
        }
    }
}
