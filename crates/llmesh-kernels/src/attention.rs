//! Attention of new positions over a key/value cache, read from the cache's buffers where they
//! lie: no transposed copy of the keys, no contiguous copy of the values, no masked scores, and
//! the query heads that share a key/value head read its cached positions once. A decode step
//! (one new position) runs it once per layer per generated token.

use rayon::prelude::*;

use crate::{Backend, KernelError};

/// A type the key/value cache may hold: f32, or f16 at half the memory (widened to f32 as the
/// attention reads it, a chunk of positions at a time).
pub trait KvElem: Copy + Send + Sync + sealed::Sealed {
    /// Whether values are widened into a scratch buffer before use.
    const WIDENS: bool;

    /// `src` as f32: itself, or widened into the start of `scratch` (at least as long).
    fn widened<'a>(src: &'a [Self], scratch: &'a mut [f32]) -> &'a [f32];
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
}

impl KvElem for f32 {
    const WIDENS: bool = false;

    #[inline]
    fn widened<'a>(src: &'a [f32], _: &'a mut [f32]) -> &'a [f32] {
        src
    }
}

impl KvElem for half::f16 {
    const WIDENS: bool = true;

    #[inline]
    fn widened<'a>(src: &'a [half::f16], scratch: &'a mut [f32]) -> &'a [f32] {
        use half::slice::HalfFloatSliceExt;
        let out = &mut scratch[..src.len()];
        crate::widen_halves(src.reinterpret_cast(), out);
        out
    }
}

/// Shape of one layer's attention and of its cache buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (a divisor of `heads`: grouped-query attention).
    pub kv_heads: usize,
    /// Values per head.
    pub head_dim: usize,
    /// Positions each key/value head's buffer holds: head `g`'s position `p` starts at value
    /// `(g × capacity + p) × head_dim` of the keys and of the values.
    pub capacity: usize,
}

impl AttnShape {
    fn check<T: KvElem>(
        &self,
        q: &[f32],
        keys: &[T],
        values: &[T],
        positions: &std::ops::Range<usize>,
        out: &[f32],
    ) -> Result<(), KernelError> {
        let AttnShape {
            heads,
            kv_heads,
            head_dim: d,
            capacity,
        } = *self;
        let fail = |what: String| {
            Err(KernelError::Operands {
                rows: heads,
                cols: d,
                what,
            })
        };
        if kv_heads == 0 || heads % kv_heads != 0 || d == 0 {
            return fail(format!(
                "{heads} query heads cannot share {kv_heads} key/value heads of {d} values"
            ));
        }
        if positions.is_empty() || positions.end > capacity {
            return fail(format!(
                "positions {positions:?} are not a non-empty part of a cache of {capacity}"
            ));
        }
        let cache = kv_heads * capacity * d;
        if q.len() != heads * d || out.len() != heads * d {
            return fail(format!(
                "{} query and {} output values (want {})",
                q.len(),
                out.len(),
                heads * d
            ));
        }
        if keys.len() < cache || values.len() < cache {
            return fail(format!(
                "{} keys and {} values for a cache of {cache}",
                keys.len(),
                values.len()
            ));
        }
        Ok(())
    }
}

/// Causal attention of the last `t` of `total` cached positions: `q` holds their queries as
/// `[heads, t, head_dim]`, `out` receives `[t, heads × head_dim]`. New position `i` (cached
/// position `total - t + i`) attends over the cached positions up to and including itself, and
/// only the last `window` of those where the model has a sliding window. The (position,
/// key/value head) pairs are shared among the threads of rayon's pool.
#[allow(clippy::too_many_arguments)]
pub fn attend_causal<T: KvElem>(
    backend: Backend,
    shape: AttnShape,
    q: &[f32],
    t: usize,
    total: usize,
    window: Option<usize>,
    keys: &[T],
    values: &[T],
    scale: f32,
    out: &mut [f32],
) -> Result<(), KernelError> {
    let (heads, d) = (shape.heads, shape.head_dim);
    let fail = |what: String| {
        Err(KernelError::Operands {
            rows: heads,
            cols: d,
            what,
        })
    };
    if t == 0 || total < t || window == Some(0) {
        return fail(format!(
            "{t} new positions of {total} cached with a window of {window:?}"
        ));
    }
    if q.len() != heads * t * d || out.len() != heads * t * d {
        return fail(format!(
            "{} query and {} output values for {t} positions (want {})",
            q.len(),
            out.len(),
            heads * t * d
        ));
    }
    // The checks of one position's attention, for the widest range of positions read.
    shape.check(
        &q[..heads * d],
        keys,
        values,
        &(0..total),
        &out[..heads * d],
    )?;
    let head_cache = shape.capacity * d;
    if T::WIDENS && t > 1 {
        // A prompt's positions each read most of the cache: widen the cached positions once
        // (in the cache's layout) rather than once per new position.
        let widen = |src: &[T]| {
            let mut wide = vec![0f32; shape.kv_heads * head_cache];
            for (w, s) in wide
                .chunks_exact_mut(head_cache)
                .zip(src.chunks_exact(head_cache))
            {
                T::widened(&s[..total * d], &mut w[..total * d]);
            }
            wide
        };
        let (k, v) = (widen(keys), widen(values));
        return attend_causal(backend, shape, q, t, total, window, &k, &v, scale, out);
    }
    let group = heads / shape.kv_heads;
    let fused = backend != Backend::Portable && crate::simd_available() && fma_available();
    let work = |(c, o): (usize, &mut [f32])| {
        let (i, g) = (c / shape.kv_heads, c % shape.kv_heads);
        let end = total - t + i + 1;
        let first = window.map_or(0, |w| end.saturating_sub(w));
        let ks = &keys[g * head_cache..][first * d..end * d];
        let vs = &values[g * head_cache..][first * d..end * d];
        let mut qs = vec![0f32; group * d];
        for (h, qh) in qs.chunks_exact_mut(d).enumerate() {
            qh.copy_from_slice(&q[((g * group + h) * t + i) * d..][..d]);
        }
        #[cfg(target_arch = "x86_64")]
        if fused {
            // SAFETY: fma_available() confirmed the CPU features.
            unsafe { attend_group_fma(&qs, ks, vs, d, scale, o) };
            return;
        }
        let _ = fused;
        attend_group::<false, T>(&qs, ks, vs, d, scale, o);
    };
    // Below this many multiply-adds (counting every position as seeing all `total`) a parallel
    // loop costs more than it saves: a decode step early in a sequence.
    const PARALLEL_WORK: usize = 1 << 15;
    if 2 * heads * t * total * d < PARALLEL_WORK {
        out.chunks_exact_mut(group * d).enumerate().for_each(work);
    } else {
        out.par_chunks_exact_mut(group * d)
            .enumerate()
            .for_each(work);
    }
    Ok(())
}

fn fma_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// [`attend_group`] compiled for AVX2 and FMA (the same code, inlined here, vectorised 8 wide
/// with fused multiply-adds).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_group_fma<T: KvElem>(
    q: &[f32],
    ks: &[T],
    vs: &[T],
    d: usize,
    scale: f32,
    o: &mut [f32],
) {
    attend_group::<true, T>(q, ks, vs, d, scale, o);
}

/// Cached positions widened at a time from a half-precision cache (with 128 values per head,
/// 32 KiB of f32: they stay in the L1 or L2 cache while they are used).
const WIDEN_POSITIONS: usize = 64;

/// The query heads `q` (`group × d`) of one key/value head over its cached keys `ks` and
/// values `vs` (`n × d` each), into `o` (`group × d`).
#[inline(always)]
fn attend_group<const FMA: bool, T: KvElem>(
    q: &[f32],
    ks: &[T],
    vs: &[T],
    d: usize,
    scale: f32,
    o: &mut [f32],
) {
    let group = q.len() / d;
    let n = ks.len() / d;
    let chunk = WIDEN_POSITIONS * d;
    let mut scratch = vec![0f32; if T::WIDENS { chunk.min(ks.len()) } else { 0 }];
    // Scores of the group's query heads, head by head; each cached key is read once.
    let mut scores = vec![0f32; group * n];
    for (c, kc) in ks.chunks(chunk).enumerate() {
        let kc = T::widened(kc, &mut scratch);
        for (j, k) in kc.chunks_exact(d).enumerate() {
            let j = c * WIDEN_POSITIONS + j;
            for (h, qh) in q.chunks_exact(d).enumerate() {
                scores[h * n + j] = dot::<FMA>(qh, k) * scale;
            }
        }
    }
    let mut norms = vec![0f32; group];
    for (s, norm) in scores.chunks_exact_mut(n).zip(&mut norms) {
        let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for x in s.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        *norm = 1.0 / sum;
    }
    o.fill(0.0);
    for (c, vc) in vs.chunks(chunk).enumerate() {
        let vc = T::widened(vc, &mut scratch);
        for (j, v) in vc.chunks_exact(d).enumerate() {
            let j = c * WIDEN_POSITIONS + j;
            for (h, oh) in o.chunks_exact_mut(d).enumerate() {
                axpy::<FMA>(oh, scores[h * n + j], v);
            }
        }
    }
    for (oh, norm) in o.chunks_exact_mut(d).zip(norms) {
        oh.iter_mut().for_each(|x| *x *= norm);
    }
}

/// Lanes of the partial sums in [`dot`]: independent chains the compiler keeps in registers.
const LANES: usize = 8;

/// `a × b + c`, fused where the caller is compiled with FMA (else a separate multiply and add:
/// without the instruction `mul_add` would be a slow library call).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

#[inline(always)]
fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..LANES {
            acc[l] = madd::<FMA>(x[l], y[l], acc[l]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn axpy<const FMA: bool>(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y = madd::<FMA>(a, *x, *y);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// One new position (the last of `positions.end` cached) attending over `positions`: the
    /// window is the range's length.
    #[allow(clippy::too_many_arguments)]
    fn attend_one(
        backend: Backend,
        shape: AttnShape,
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        positions: std::ops::Range<usize>,
        scale: f32,
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        let window = Some(positions.len());
        attend_causal(
            backend,
            shape,
            q,
            1,
            positions.end,
            window,
            keys,
            values,
            scale,
            out,
        )
    }

    /// Attention in f64, the plain way: scores, softmax, weighted sum, head by head.
    fn reference(
        shape: AttnShape,
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        positions: std::ops::Range<usize>,
        scale: f32,
    ) -> Vec<f32> {
        let d = shape.head_dim;
        let group = shape.heads / shape.kv_heads;
        let mut out = vec![0f32; shape.heads * d];
        for h in 0..shape.heads {
            let g = h / group;
            let at = |buf: &[f32], p: usize, i: usize| buf[(g * shape.capacity + p) * d + i] as f64;
            let scores: Vec<f64> = positions
                .clone()
                .map(|p| {
                    (0..d)
                        .map(|i| q[h * d + i] as f64 * at(keys, p, i))
                        .sum::<f64>()
                })
                .map(|s| s * scale as f64)
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for i in 0..d {
                let v: f64 = positions
                    .clone()
                    .zip(&e)
                    .map(|(p, w)| w * at(values, p, i))
                    .sum();
                out[h * d + i] = (v / sum) as f32;
            }
        }
        out
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| {
                let x = i
                    .wrapping_mul(2654435761)
                    .wrapping_add(seed.wrapping_mul(40503));
                ((x >> 8) % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    fn attn_shape(heads: usize, kv_heads: usize, head_dim: usize, capacity: usize) -> AttnShape {
        AttnShape {
            heads,
            kv_heads,
            head_dim,
            capacity,
        }
    }

    /// Keys large enough that the softmax is far from uniform.
    fn keys(n: usize, seed: u32) -> Vec<f32> {
        values(n, seed).iter().map(|k| k * 4.0).collect()
    }

    #[test]
    fn matches_the_reference_for_grouped_heads_windows_and_odd_sizes() {
        // (heads, kv_heads, head_dim, capacity, positions): multi-head, grouped, one kv head,
        // odd head sizes, windows not starting at 0, enough work for the parallel path.
        let cases = [
            (4, 4, 8, 16, 0..1),
            (8, 2, 16, 40, 0..37),
            (6, 3, 5, 9, 2..9),
            (3, 1, 13, 20, 7..8),
            (32, 8, 64, 300, 0..257),
            (32, 8, 64, 300, 100..300),
        ];
        for (i, (heads, kv_heads, d, capacity, positions)) in cases.into_iter().enumerate() {
            let shape = attn_shape(heads, kv_heads, d, capacity);
            let q = values(heads * d, 3 * i as u32);
            let keys = keys(kv_heads * capacity * d, 3 * i as u32 + 1);
            let vals = values(kv_heads * capacity * d, 3 * i as u32 + 2);
            let scale = 1.0 / (d as f32).sqrt();
            let want = reference(shape, &q, &keys, &vals, positions.clone(), scale);
            for backend in [Backend::Auto, Backend::Portable] {
                let mut out = vec![f32::NAN; heads * d];
                let p = positions.clone();
                attend_one(backend, shape, &q, &keys, &vals, p, scale, &mut out).unwrap();
                for (j, (a, b)) in out.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-5 + 1e-4 * b.abs(),
                        "{backend:?} case {i} value {j}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn causal_attention_equals_one_position_at_a_time() {
        // (heads, kv_heads, head_dim, capacity, t, total, window)
        let cases = [
            (4, 2, 8, 20, 5, 5, None),
            (8, 2, 16, 40, 7, 30, None),
            (6, 3, 5, 12, 12, 12, Some(4)),
            (32, 8, 64, 160, 128, 128, None),
            (4, 1, 8, 50, 9, 33, Some(10)),
        ];
        for (n, (heads, kv_heads, d, capacity, t, total, window)) in cases.into_iter().enumerate() {
            let shape = attn_shape(heads, kv_heads, d, capacity);
            let q = values(heads * t * d, 7 * n as u32);
            let keys = keys(kv_heads * capacity * d, 7 * n as u32 + 1);
            let vals = values(kv_heads * capacity * d, 7 * n as u32 + 2);
            let scale = 1.0 / (d as f32).sqrt();
            for backend in [Backend::Auto, Backend::Portable] {
                let mut out = vec![f32::NAN; heads * t * d];
                attend_causal(
                    backend, shape, &q, t, total, window, &keys, &vals, scale, &mut out,
                )
                .unwrap();
                for i in 0..t {
                    let end = total - t + i + 1;
                    let first = window.map_or(0, |w| end.saturating_sub(w));
                    // Position i's queries as [heads, head_dim].
                    let qi: Vec<f32> = (0..heads)
                        .flat_map(|h| q[(h * t + i) * d..][..d].to_vec())
                        .collect();
                    let want = reference(shape, &qi, &keys, &vals, first..end, scale);
                    let got = &out[i * heads * d..][..heads * d];
                    for (j, (a, b)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (a - b).abs() <= 1e-5 + 1e-4 * b.abs(),
                            "{backend:?} case {n} position {i} value {j}: {a} vs {b}"
                        );
                    }
                }
            }
        }
        let shape = attn_shape(2, 1, 4, 8);
        let (q, kv, mut out) = (vec![0f32; 24], vec![0f32; 32], vec![0f32; 24]);
        let run = |t, total, w, o: &mut [f32]| {
            attend_causal(Backend::Auto, shape, &q, t, total, w, &kv, &kv, 1.0, o)
        };
        assert!(run(3, 5, None, &mut out).is_ok());
        assert!(run(3, 2, None, &mut out).is_err(), "fewer cached than new");
        assert!(run(3, 9, None, &mut out).is_err(), "past the capacity");
        assert!(run(3, 5, Some(0), &mut out).is_err(), "empty window");
        assert!(run(2, 5, None, &mut out).is_err(), "wrong query length");
    }

    /// A half-precision cache gives exactly what an f32 cache holding the same (rounded)
    /// values gives: widening in chunks of positions changes nothing else, windows and
    /// chunk edges included.
    #[test]
    fn half_precision_cache_equals_f32_cache_of_its_values() {
        // (heads, kv_heads, head_dim, capacity, t, total, window)
        let cases = [
            (4, 2, 8, 20, 1, 5, None),
            (8, 2, 16, 200, 1, 130, None),
            (8, 2, 16, 200, 1, 190, Some(70)),
            (6, 3, 5, 150, 40, 140, None),
            (32, 8, 64, 300, 7, 257, Some(100)),
        ];
        for (n, (heads, kv_heads, d, capacity, t, total, window)) in cases.into_iter().enumerate() {
            let shape = attn_shape(heads, kv_heads, d, capacity);
            let q = values(heads * t * d, 11 * n as u32);
            let half = |v: Vec<f32>| -> Vec<half::f16> {
                v.into_iter().map(half::f16::from_f32).collect()
            };
            let kh = half(keys(kv_heads * capacity * d, 11 * n as u32 + 1));
            let vh = half(keys(kv_heads * capacity * d, 11 * n as u32 + 2));
            let kf: Vec<f32> = kh.iter().map(|x| x.to_f32()).collect();
            let vf: Vec<f32> = vh.iter().map(|x| x.to_f32()).collect();
            let scale = 1.0 / (d as f32).sqrt();
            for backend in [Backend::Auto, Backend::Portable] {
                let mut a = vec![f32::NAN; heads * t * d];
                let mut b = vec![f32::NAN; heads * t * d];
                attend_causal(
                    backend, shape, &q, t, total, window, &kh, &vh, scale, &mut a,
                )
                .unwrap();
                attend_causal(
                    backend, shape, &q, t, total, window, &kf, &vf, scale, &mut b,
                )
                .unwrap();
                assert_eq!(a, b, "{backend:?} case {n}");
            }
        }
    }

    #[test]
    fn positions_outside_the_range_are_not_read() {
        let shape = attn_shape(2, 1, 4, 10);
        let q = values(8, 1);
        let mut keys = values(40, 2);
        let mut vals = values(40, 3);
        let mut a = vec![0f32; 8];
        attend_one(Backend::Auto, shape, &q, &keys, &vals, 3..7, 0.5, &mut a).unwrap();
        for p in (0..3).chain(7..10) {
            for i in 0..4 {
                keys[p * 4 + i] = f32::NAN;
                vals[p * 4 + i] = f32::INFINITY;
            }
        }
        let mut b = vec![0f32; 8];
        attend_one(Backend::Auto, shape, &q, &keys, &vals, 3..7, 0.5, &mut b).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn bad_operands_are_errors() {
        let shape = attn_shape(4, 2, 4, 8);
        let (q, kv, mut out) = (vec![0f32; 16], vec![0f32; 64], vec![0f32; 16]);
        let run =
            |s: AttnShape, q: &[f32], kv: &[f32], p: std::ops::Range<usize>, o: &mut [f32]| {
                attend_one(Backend::Auto, s, q, kv, kv, p, 1.0, o)
            };
        assert!(run(shape, &q, &kv, 0..8, &mut out).is_ok());
        assert!(
            run(shape, &q, &kv, 0..9, &mut out).is_err(),
            "past the capacity"
        );
        assert!(run(shape, &q, &kv, 3..3, &mut out).is_err(), "no positions");
        assert!(
            run(shape, &q[..12], &kv, 0..4, &mut out).is_err(),
            "short query"
        );
        assert!(
            run(shape, &q, &kv[..60], 0..4, &mut out).is_err(),
            "short cache"
        );
        let odd = AttnShape {
            kv_heads: 3,
            ..shape
        };
        assert!(
            run(odd, &q, &kv, 0..4, &mut out).is_err(),
            "heads not a multiple"
        );
    }
}
