//! AVX2 + FMA + F16C kernels. Each computes one weight row against `M` activation rows at once,
//! so a weight block is loaded and unpacked once for up to four rows of a prompt; with `M = 1`
//! it is the decode path. Integer products use the `maddubs` (u8 × i8) instruction as llama.cpp
//! does: 4-bit and 6-bit codes are unsigned already, signed 8-bit weights go through `sign`.
//!
//! Every function here requires the CPU features it is compiled for; [`available`] says whether
//! they are present, and callers check it once before calling any of them.

#![allow(clippy::missing_safety_doc, clippy::needless_range_loop)]

use std::arch::x86_64::*;

use std::ops::Range;

use crate::act::ActRow;

/// How far ahead of the decode loop weights are prefetched, in bytes.
const PREFETCH: usize = 2048;

/// Asks for the cache lines of `len` bytes at `p + PREFETCH` (a hint: an address past the
/// weights is never dereferenced).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn prefetch_ahead(p: *const u8, len: usize) {
    let mut at = 0;
    while at < len {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH + at) as *const i8);
        at += 64;
    }
}

/// Whether this CPU has the features these kernels need.
pub(crate) fn available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hsum_ps(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// An f16 stored at `p` (unaligned), widened.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn half(p: *const u8) -> f32 {
    // SAFETY: the caller guarantees two readable bytes at `p`.
    let bits = unsafe { std::ptr::read_unaligned(p as *const u16) };
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
}

/// Eight f16 values `stride` bytes apart, widened. Built from fresh registers, so it never
/// waits on an accumulator (a scalar `vpinsrw` into a reused register would).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn halves8(p: *const u8, stride: usize) -> __m256 {
    // SAFETY: the caller guarantees two readable bytes at each of the 8 places.
    let h = |i: usize| unsafe { std::ptr::read_unaligned(p.add(i * stride) as *const u16) } as i16;
    _mm256_cvtph_ps(_mm_set_epi16(
        h(7),
        h(6),
        h(5),
        h(4),
        h(3),
        h(2),
        h(1),
        h(0),
    ))
}

/// The signed 8-bit codes of one Q8_0 or Q4_0 block (Q4_0 codes shifted to -8..7).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn codes_32<const Q4: bool>(blk: *const u8) -> __m256i {
    // SAFETY: the caller guarantees a whole block at `blk`.
    unsafe {
        if Q4 {
            let q = _mm_loadu_si128(blk.add(2) as *const __m128i);
            let m4 = _mm_set1_epi8(0x0f);
            let lo = _mm_and_si128(q, m4);
            let hi = _mm_and_si128(_mm_srli_epi16(q, 4), m4);
            _mm256_sub_epi8(_mm256_set_m128i(hi, lo), _mm256_set1_epi8(8))
        } else {
            _mm256_loadu_si256(blk.add(2) as *const __m256i)
        }
    }
}

/// Q8_0 or Q4_0 weights (blocks of 32) against 8-bit activation blocks. Blocks go in groups of
/// eight: their scales are widened together and each row keeps two accumulators, so no block
/// waits for the previous block's multiply-add.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn q_32<const M: usize, const Q4: bool>(
    w: &[u8],
    xs: [ActRow<'_>; M],
) -> [f32; M] {
    let bb = if Q4 { 18 } else { 34 };
    let nb = w.len() / bb;
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); 2]; M];
    let wp = w.as_ptr();
    let mut b = 0;
    while b < nb {
        let group = (nb - b).min(8);
        // SAFETY: blocks b..b+group lie within `w`; activation rows hold nb * 32 values and nb
        // scales (the caller checked the shapes). A short last group reads its scales one by
        // one.
        unsafe {
            let dw = if group == 8 {
                halves8(wp.add(b * bb), bb)
            } else {
                let mut v = [0f32; 8];
                for (i, v) in v.iter_mut().enumerate().take(group) {
                    let bits = std::ptr::read_unaligned(wp.add((b + i) * bb) as *const u16);
                    *v = half::f16::from_bits(bits).to_f32();
                }
                _mm256_loadu_ps(v.as_ptr())
            };
            let mut scale = [_mm256_setzero_ps(); M];
            for r in 0..M {
                let xd = if group == 8 {
                    _mm256_loadu_ps(xs[r].d.as_ptr().add(b))
                } else {
                    let mut v = [0f32; 8];
                    v[..group].copy_from_slice(&xs[r].d[b..b + group]);
                    _mm256_loadu_ps(v.as_ptr())
                };
                scale[r] = _mm256_mul_ps(dw, xd);
            }
            for i in 0..group {
                let wv = codes_32::<Q4>(wp.add((b + i) * bb));
                let aw = _mm256_sign_epi8(wv, wv);
                let lane = _mm256_set1_epi32(i as i32);
                for r in 0..M {
                    let xv =
                        _mm256_loadu_si256(xs[r].q.as_ptr().add((b + i) * 32) as *const __m256i);
                    let p =
                        _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, wv)), ones);
                    let s = _mm256_permutevar8x32_ps(scale[r], lane);
                    acc[r][i & 1] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(p), acc[r][i & 1]);
                }
            }
        }
        b += group;
    }
    acc.map(|[a, b]| hsum_ps(_mm256_add_ps(a, b)))
}

/// Q4_K weights against 8-bit activation super-blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn q4k<const M: usize>(w: &[u8], xs: [ActRow<'_>; M]) -> [f32; M] {
    let nsb = w.len() / 144;
    let m4 = _mm256_set1_epi8(0x0f);
    let mut acc = [_mm256_setzero_ps(); M];
    let mut mins = [0f32; M];
    let wp = w.as_ptr();
    for sb in 0..nsb {
        // SAFETY: super-block `sb` lies within `w`; activation rows hold nsb * 256 values,
        // nsb scales and nsb * 16 sums.
        unsafe {
            let blk = wp.add(sb * 144);
            let d = half(blk);
            let dmin = half(blk.add(2));
            let s = std::slice::from_raw_parts(blk.add(4), 12);
            let mut sc = [0i16; 8];
            let mut mn = [0i32; 8];
            for j in 0..8 {
                let (a, m) = crate::formats::q4k_scale_min(j, s);
                sc[j] = i16::from(a);
                mn[j] = i32::from(m);
            }
            let qs = blk.add(16);
            let mut isum = [_mm256_setzero_si256(); M];
            for c in 0..4 {
                let qv = _mm256_loadu_si256(qs.add(32 * c) as *const __m256i);
                let lo = _mm256_and_si256(qv, m4);
                let hi = _mm256_and_si256(_mm256_srli_epi16(qv, 4), m4);
                let s_lo = _mm256_set1_epi16(sc[2 * c]);
                let s_hi = _mm256_set1_epi16(sc[2 * c + 1]);
                for r in 0..M {
                    let x = xs[r].q.as_ptr().add(256 * sb + 64 * c);
                    let x_lo = _mm256_loadu_si256(x as *const __m256i);
                    let x_hi = _mm256_loadu_si256(x.add(32) as *const __m256i);
                    let p_lo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, x_lo), s_lo);
                    let p_hi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, x_hi), s_hi);
                    isum[r] = _mm256_add_epi32(isum[r], _mm256_add_epi32(p_lo, p_hi));
                }
            }
            for r in 0..M {
                let bs = xs[r].bsums.as_ptr().add(16 * sb);
                let mut m = 0i32;
                for j in 0..8 {
                    m += mn[j] * (i32::from(*bs.add(2 * j)) + i32::from(*bs.add(2 * j + 1)));
                }
                let xd = *xs[r].d.get_unchecked(sb);
                acc[r] =
                    _mm256_fmadd_ps(_mm256_set1_ps(d * xd), _mm256_cvtepi32_ps(isum[r]), acc[r]);
                mins[r] += dmin * xd * m as f32;
            }
        }
    }
    let mut out = [0f32; M];
    for r in 0..M {
        out[r] = hsum_ps(acc[r]) - mins[r];
    }
    out
}

/// Q6_K weights against 8-bit activation super-blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn q6k<const M: usize>(w: &[u8], xs: [ActRow<'_>; M]) -> [f32; M] {
    let nsb = w.len() / 210;
    let m4 = _mm256_set1_epi8(0x0f);
    let m3 = _mm256_set1_epi8(3);
    let m30 = _mm256_set1_epi8(0x30);
    let mut acc = [_mm256_setzero_ps(); M];
    let wp = w.as_ptr();
    for sb in 0..nsb {
        // SAFETY: super-block `sb` lies within `w`; activation rows hold nsb * 256 values,
        // nsb scales and nsb * 16 sums.
        unsafe {
            let blk = wp.add(sb * 210);
            prefetch_ahead(blk, 210);
            let d = half(blk.add(208));
            let scp = blk.add(192) as *const i8;
            let mut isum = [_mm256_setzero_si256(); M];
            for h in 0..2 {
                let ql0 = _mm256_loadu_si256(blk.add(64 * h) as *const __m256i);
                let ql1 = _mm256_loadu_si256(blk.add(64 * h + 32) as *const __m256i);
                let qh = _mm256_loadu_si256(blk.add(128 + 32 * h) as *const __m256i);
                let q = [
                    _mm256_or_si256(
                        _mm256_and_si256(ql0, m4),
                        _mm256_slli_epi16(_mm256_and_si256(qh, m3), 4),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(ql1, m4),
                        _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), m3), 4),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
                        _mm256_and_si256(qh, m30),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                        _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30),
                    ),
                ];
                let sc = |k: usize| _mm_set1_epi16(i16::from(*scp.add(8 * h + k)));
                let scales = [
                    _mm256_set_m128i(sc(1), sc(0)),
                    _mm256_set_m128i(sc(3), sc(2)),
                    _mm256_set_m128i(sc(5), sc(4)),
                    _mm256_set_m128i(sc(7), sc(6)),
                ];
                for r in 0..M {
                    let x = xs[r].q.as_ptr().add(256 * sb + 128 * h);
                    for k in 0..4 {
                        let xv = _mm256_loadu_si256(x.add(32 * k) as *const __m256i);
                        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(q[k], xv), scales[k]);
                        isum[r] = _mm256_add_epi32(isum[r], p);
                    }
                }
            }
            // The codes carry an offset of 32: subtract 32 × Σ scale × (sum of 16 activations).
            let scv = _mm256_cvtepi8_epi16(_mm_loadu_si128(scp as *const __m128i));
            for r in 0..M {
                let bs = _mm256_loadu_si256(xs[r].bsums.as_ptr().add(16 * sb) as *const __m256i);
                let off = _mm256_slli_epi32(_mm256_madd_epi16(scv, bs), 5);
                let s = _mm256_sub_epi32(isum[r], off);
                let xd = *xs[r].d.get_unchecked(sb);
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * xd), _mm256_cvtepi32_ps(s), acc[r]);
            }
        }
    }
    acc.map(|a| hsum_ps(a))
}

/// How a float weight type is widened to 8 f32 lanes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Float {
    F32,
    F16,
    BF16,
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load8(kind: Float, p: *const u8) -> __m256 {
    // SAFETY: the caller guarantees 8 readable elements at `p`.
    unsafe {
        match kind {
            Float::F32 => _mm256_loadu_ps(p as *const f32),
            Float::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
            Float::BF16 => _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)),
                16,
            )),
        }
    }
}

/// Float weights (f32, f16 or bf16) against f32 activations.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn float<const M: usize>(kind: Float, w: &[u8], xs: [ActRow<'_>; M]) -> [f32; M] {
    let es = if kind == Float::F32 { 4 } else { 2 };
    let k = w.len() / es;
    let main = k / 16 * 16;
    let mut a0 = [_mm256_setzero_ps(); M];
    let mut a1 = [_mm256_setzero_ps(); M];
    let wp = w.as_ptr();
    let mut i = 0;
    while i < main {
        // SAFETY: i + 16 <= k elements of `w` and of each activation row.
        unsafe {
            let w0 = load8(kind, wp.add(i * es));
            let w1 = load8(kind, wp.add((i + 8) * es));
            for r in 0..M {
                let x = xs[r].f.as_ptr().add(i);
                a0[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x), a0[r]);
                a1[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x.add(8)), a1[r]);
            }
        }
        i += 16;
    }
    let mut out = [0f32; M];
    for r in 0..M {
        out[r] = hsum_ps(_mm256_add_ps(a0[r], a1[r]));
        if main < k {
            let tail = crate::portable::dot(
                match kind {
                    Float::F32 => crate::QType::F32,
                    Float::F16 => crate::QType::F16,
                    Float::BF16 => crate::QType::BF16,
                },
                &w[main * es..],
                ActRow {
                    f: &xs[r].f[main..],
                    ..xs[r]
                },
            );
            out[r] += tail;
        }
    }
    out
}

/// Block columns `blocks` of eight interleaved Q4_0 rows (the group starts at `g`) against `M`
/// activation rows, added into `acc`: lane `l` of `acc[r]` is weight row `l` of the group times
/// activation row `r`.
///
/// The interleaved kernels share this form: the caller guarantees that the group holds the
/// block columns `blocks` and that every activation row holds their values, scales and sums.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn q4_0x8<const M: usize>(
    g: *const u8,
    xs: &[ActRow<'_>; M],
    blocks: Range<usize>,
    acc: &mut [__m256; M],
) {
    let m4 = _mm256_set1_epi8(0x0f);
    let ones = _mm256_set1_epi16(1);
    for b in blocks {
        // SAFETY: the caller's guarantee (see above).
        unsafe {
            let blk = g.add(b * 144);
            prefetch_ahead(blk, 144);
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
            let mut codes = [_mm256_setzero_si256(); 8];
            for c in 0..4 {
                let v = _mm256_loadu_si256(blk.add(16 + 32 * c) as *const __m256i);
                codes[c] = _mm256_and_si256(v, m4);
                codes[c + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
            }
            for r in 0..M {
                let x = xs[r].q.as_ptr().add(32 * b);
                let mut s = _mm256_setzero_si256();
                for (c, code) in codes.iter().enumerate() {
                    let xb =
                        _mm256_set1_epi32(std::ptr::read_unaligned(x.add(4 * c) as *const i32));
                    // Codes are 0..15 and |x| <= 127: eight pair sums stay within i16.
                    s = _mm256_add_epi16(s, _mm256_maddubs_epi16(*code, xb));
                }
                // The codes carry an offset of 8: subtract 8 × the block's activation sum.
                let i = _mm256_sub_epi32(
                    _mm256_madd_epi16(s, ones),
                    _mm256_set1_epi32(8 * *xs[r].sums.get_unchecked(b)),
                );
                acc[r] = add_scaled(acc[r], dw, *xs[r].d.get_unchecked(b), i);
            }
        }
    }
}

/// Eight interleaved Q8_0 rows against `M` activation rows (as [`q4_0x8`]).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn q8_0x8<const M: usize>(
    g: *const u8,
    xs: &[ActRow<'_>; M],
    blocks: Range<usize>,
    acc: &mut [__m256; M],
) {
    let ones = _mm256_set1_epi16(1);
    for b in blocks {
        // SAFETY: as in q4_0x8.
        unsafe {
            let blk = g.add(b * 272);
            prefetch_ahead(blk, 272);
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
            let mut s = [_mm256_setzero_si256(); M];
            // Half a block's codes (and their magnitudes) at a time, shared by the M rows.
            for h in 0..2 {
                let mut w = [_mm256_setzero_si256(); 4];
                let mut aw = [_mm256_setzero_si256(); 4];
                for c in 0..4 {
                    w[c] = _mm256_loadu_si256(blk.add(16 + 32 * (4 * h + c)) as *const __m256i);
                    aw[c] = _mm256_sign_epi8(w[c], w[c]);
                }
                for r in 0..M {
                    let x = xs[r].q.as_ptr().add(32 * b + 16 * h);
                    for c in 0..4 {
                        let xb =
                            _mm256_set1_epi32(std::ptr::read_unaligned(x.add(4 * c) as *const i32));
                        let p = _mm256_maddubs_epi16(aw[c], _mm256_sign_epi8(xb, w[c]));
                        s[r] = _mm256_add_epi32(s[r], _mm256_madd_epi16(p, ones));
                    }
                }
            }
            for r in 0..M {
                acc[r] = add_scaled(acc[r], dw, *xs[r].d.get_unchecked(b), s[r]);
            }
        }
    }
}

/// `acc` plus a block's integer dot products of eight rows (`i`) times the rows' scales `dw`
/// and the activation block's scale `dx`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) fn add_scaled(acc: __m256, dw: __m256, dx: f32, i: __m256i) -> __m256 {
    _mm256_fmadd_ps(
        _mm256_mul_ps(dw, _mm256_set1_ps(dx)),
        _mm256_cvtepi32_ps(i),
        acc,
    )
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) fn lanes<const M: usize>(acc: [__m256; M]) -> [[f32; 8]; M] {
    let mut out = [[0f32; 8]; M];
    for (o, a) in out.iter_mut().zip(acc) {
        // SAFETY: an unaligned store of 8 floats into an 8-float array.
        unsafe { _mm256_storeu_ps(o.as_mut_ptr(), a) };
    }
    out
}

/// `pshufb` controls that spread byte `j` of each row's 4-byte group (rows 0..4 of a 128-bit
/// lane) into both 16-bit halves of that row's 32-bit lane, zero-extended.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn spread_controls() -> [__m256i; 4] {
    let mut out = [_mm256_setzero_si256(); 4];
    for (j, o) in out.iter_mut().enumerate() {
        let mut c = [0x80u8 as i8; 32];
        for lane in 0..2 {
            for r in 0..4 {
                let at = 16 * lane + 4 * r;
                c[at] = (4 * r + j) as i8;
                c[at + 2] = (4 * r + j) as i8;
            }
        }
        // SAFETY: an unaligned load of a 32-byte local array.
        *o = unsafe { _mm256_loadu_si256(c.as_ptr() as *const __m256i) };
    }
    out
}

/// The header of an interleaved Q4_K super-block column: the eight rows' `d` and `dmin`, and
/// the 6-bit scales and mins of sub-blocks 0..4 (`sc_lo`, `mn_lo`) and 4..8 (`sc_hi`, `mn_hi`),
/// one byte per row and sub-block (see `formats::q4k_scale_min`).
pub(crate) struct Q4kHeader {
    pub d: __m256,
    pub dmin: __m256,
    pub sc_lo: __m256i,
    pub sc_hi: __m256i,
    pub mn_lo: __m256i,
    pub mn_hi: __m256i,
}

/// Reads the header of the super-block column at `blk`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn q4k_header(blk: *const u8) -> Q4kHeader {
    let m4 = _mm256_set1_epi8(0x0f);
    let m3 = _mm256_set1_epi8(3);
    let m63 = _mm256_set1_epi8(63);
    // SAFETY: the caller guarantees a whole super-block column at `blk`.
    unsafe {
        let a = _mm256_loadu_si256(blk.add(32) as *const __m256i);
        let b = _mm256_loadu_si256(blk.add(64) as *const __m256i);
        let c = _mm256_loadu_si256(blk.add(96) as *const __m256i);
        let top = |v: __m256i| _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 6), m3), 4);
        Q4kHeader {
            d: _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i)),
            dmin: _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16) as *const __m128i)),
            sc_lo: _mm256_and_si256(a, m63),
            sc_hi: _mm256_or_si256(_mm256_and_si256(c, m4), top(a)),
            mn_lo: _mm256_and_si256(b, m63),
            mn_hi: _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(c, 4), m4), top(b)),
        }
    }
}

/// Adds super-block column `sb`'s part to each row's `acc`: `d` (the rows' scales, as the
/// caller's sums need them) × the activation scale × `isum`, less the mins' part: each row's
/// sub-block min (twice in its lane, `spread`) times the activations' two 16-value sums over
/// that sub-block, one multiply-add per sub-block, no scalar arithmetic.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn q4k_finish<const M: usize>(
    h: &Q4kHeader,
    d: __m256,
    isum: &[__m256i; M],
    xs: &[ActRow<'_>; M],
    sb: usize,
    acc: &mut [__m256; M],
) {
    let ctrl = spread_controls();
    let spread = |j: usize| _mm256_shuffle_epi8(if j < 4 { h.mn_lo } else { h.mn_hi }, ctrl[j % 4]);
    for r in 0..M {
        // SAFETY: the caller guarantees activation rows of `sb + 1` super-blocks or more.
        unsafe {
            let bs = xs[r].bsums.as_ptr().add(16 * sb);
            let mut msum = _mm256_setzero_si256();
            for j in 0..8 {
                let pair = _mm256_set1_epi32(std::ptr::read_unaligned(bs.add(2 * j) as *const i32));
                msum = _mm256_add_epi32(msum, _mm256_madd_epi16(spread(j), pair));
            }
            let dx = _mm256_set1_ps(*xs[r].d.get_unchecked(sb));
            acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(d, dx), _mm256_cvtepi32_ps(isum[r]), acc[r]);
            acc[r] = _mm256_fnmadd_ps(_mm256_mul_ps(h.dmin, dx), _mm256_cvtepi32_ps(msum), acc[r]);
        }
    }
}

/// The four code vectors of one run of four positions of an interleaved Q6_K group (the
/// three vectors X, Y, Z at `at`; see [`q6kx8`]): quarter `q`'s 6-bit codes of the eight rows.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn q6k_codes(at: *const u8) -> [__m256i; 4] {
    let m4 = _mm256_set1_epi8(0x0f);
    let m63 = _mm256_set1_epi8(63);
    let m30 = _mm256_set1_epi8(0x30);
    // SAFETY: the caller guarantees 96 readable bytes at `at`.
    let (x, y, z) = unsafe {
        (
            _mm256_loadu_si256(at as *const __m256i),
            _mm256_loadu_si256(at.add(32) as *const __m256i),
            _mm256_loadu_si256(at.add(64) as *const __m256i),
        )
    };
    let top = |v: __m256i| _mm256_and_si256(_mm256_srli_epi16(v, 2), m30);
    [
        _mm256_and_si256(x, m63),
        _mm256_and_si256(y, m63),
        _mm256_or_si256(_mm256_and_si256(z, m4), top(x)),
        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(z, 4), m4), top(y)),
    ]
}

/// Eight interleaved Q4_K rows against `M` activation rows (as [`q4_0x8`]).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn q4kx8<const M: usize>(
    g: *const u8,
    xs: &[ActRow<'_>; M],
    blocks: Range<usize>,
    acc: &mut [__m256; M],
) {
    let m4 = _mm256_set1_epi8(0x0f);
    let ctrl = spread_controls();
    for sb in blocks {
        // SAFETY: as in q4_0x8.
        unsafe {
            let blk = g.add(sb * 1152);
            prefetch_ahead(blk, 1152);
            let h = q4k_header(blk);
            // Sub-block j's scale byte of each row, twice in the row's 32-bit lane.
            let spread = |lo: __m256i, hi: __m256i, j: usize| {
                _mm256_shuffle_epi8(if j < 4 { lo } else { hi }, ctrl[j % 4])
            };
            let codes = blk.add(128);
            // Sub-blocks 2ch and 2ch + 1 share their code bytes (low and high nibbles): each
            // code vector is loaded once for both and serves all M activation rows.
            let mut isum = [_mm256_setzero_si256(); M];
            for ch in 0..4 {
                let mut s_lo = [_mm256_setzero_si256(); M];
                let mut s_hi = [_mm256_setzero_si256(); M];
                for q in 0..8 {
                    let v = _mm256_loadu_si256(codes.add(32 * (8 * ch + q)) as *const __m256i);
                    let lo = _mm256_and_si256(v, m4);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                    for r in 0..M {
                        let x = xs[r].q.as_ptr().add(256 * sb + 64 * ch + 4 * q);
                        let x_lo = _mm256_set1_epi32(std::ptr::read_unaligned(x as *const i32));
                        let x_hi =
                            _mm256_set1_epi32(std::ptr::read_unaligned(x.add(32) as *const i32));
                        // Codes are 0..15 and |x| <= 127: eight pair sums stay within i16.
                        s_lo[r] = _mm256_add_epi16(s_lo[r], _mm256_maddubs_epi16(lo, x_lo));
                        s_hi[r] = _mm256_add_epi16(s_hi[r], _mm256_maddubs_epi16(hi, x_hi));
                    }
                }
                let (sc_a, sc_b) = (
                    spread(h.sc_lo, h.sc_hi, 2 * ch),
                    spread(h.sc_lo, h.sc_hi, 2 * ch + 1),
                );
                for r in 0..M {
                    let p = _mm256_add_epi32(
                        _mm256_madd_epi16(s_lo[r], sc_a),
                        _mm256_madd_epi16(s_hi[r], sc_b),
                    );
                    isum[r] = _mm256_add_epi32(isum[r], p);
                }
            }
            q4k_finish(&h, h.d, &isum, xs, sb, acc);
        }
    }
}

/// Eight interleaved Q6_K rows against `M` activation rows (as [`q4_0x8`]; layout in
/// `repack`). For each half `n` of a super-block and run `c` of four positions, three vectors
/// X, Y, Z hold the four quarters' codes of the eight rows (`repack::q6k_xyz`): quarter 0 is
/// X's low six bits, quarter 1 Y's, quarter 2 Z's low nibble under X's top two bits, quarter 3
/// Z's high nibble under Y's top two bits.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn q6kx8<const M: usize>(
    g: *const u8,
    xs: &[ActRow<'_>; M],
    blocks: Range<usize>,
    acc: &mut [__m256; M],
) {
    // Zips the two 4 × i16 halves of each 128-bit lane: [a0..=a3, b0..=b3] → [a0, b0, a1, b1, ..].
    let zip = _mm256_setr_epi8(
        0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15, 0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12,
        13, 6, 7, 14, 15,
    );
    for sb in blocks {
        // SAFETY: as in q4_0x8.
        unsafe {
            let blk = g.add(sb * 1680);
            prefetch_ahead(blk, 1680);
            let d = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
            // Sub-scale j of the eight rows, each row's value twice in its 32-bit lane (the
            // form `madd` needs against pair sums), and sub-scales 2p, 2p + 1 side by side in
            // each row's lane (against a pair of 16-value activation sums).
            let mut scv = [_mm256_setzero_si256(); 16];
            let mut pairs = [_mm256_setzero_si256(); 8];
            for p in 0..8 {
                let s =
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(blk.add(16 + 16 * p) as *const __m128i));
                // Lane 0: scales 2p and 2p + 1 of rows 0..4; lane 1: of rows 4..8.
                let t = _mm256_permute4x64_epi64::<0b11_01_10_00>(s);
                scv[2 * p] = _mm256_unpacklo_epi16(t, t);
                scv[2 * p + 1] = _mm256_unpackhi_epi16(t, t);
                pairs[p] = _mm256_shuffle_epi8(t, zip);
            }
            let codes = blk.add(144);
            let mut isum = [_mm256_setzero_si256(); M];
            for n in 0..2 {
                for cp in 0..4 {
                    // Positions 8cp..8cp+8 of each quarter: two runs of four per row.
                    let mut cs = [[_mm256_setzero_si256(); 4]; 2];
                    for (h, cs) in cs.iter_mut().enumerate() {
                        *cs = q6k_codes(codes.add(96 * (8 * n + 2 * cp + h)));
                    }
                    for r in 0..M {
                        let x = xs[r].q.as_ptr().add(256 * sb + 128 * n + 8 * cp);
                        for q in 0..4 {
                            let xq = x.add(32 * q);
                            let x0 = _mm256_set1_epi32(std::ptr::read_unaligned(xq as *const i32));
                            let x1 = _mm256_set1_epi32(std::ptr::read_unaligned(
                                xq.add(4) as *const i32
                            ));
                            // Codes are 0..63 and |x| <= 127: two pair sums stay within i16.
                            let s16 = _mm256_add_epi16(
                                _mm256_maddubs_epi16(cs[0][q], x0),
                                _mm256_maddubs_epi16(cs[1][q], x1),
                            );
                            let j = 8 * n + 2 * q + cp / 2;
                            isum[r] = _mm256_add_epi32(isum[r], _mm256_madd_epi16(s16, scv[j]));
                        }
                    }
                }
            }
            // The codes carry an offset of 32: subtract 32 × Σ scale × (sum of 16 activations),
            // two sub-blocks per multiply-add.
            for r in 0..M {
                let bs = xs[r].bsums.as_ptr().add(16 * sb);
                let mut off = _mm256_setzero_si256();
                for (p, pair) in pairs.iter().enumerate() {
                    let b =
                        _mm256_set1_epi32(std::ptr::read_unaligned(bs.add(2 * p) as *const i32));
                    off = _mm256_add_epi32(off, _mm256_madd_epi16(*pair, b));
                }
                let s = _mm256_sub_epi32(isum[r], _mm256_slli_epi32(off, 5));
                let dx = _mm256_set1_ps(*xs[r].d.get_unchecked(sb));
                acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(d, dx), _mm256_cvtepi32_ps(s), acc[r]);
            }
        }
    }
}

/// Eight interleaved f16 or bf16 rows (element `k` of rows 0..8 side by side) against `M`
/// activation rows: an outer product per element, one multiply-add per activation row, with
/// results in the lanes as in [`q4_0x8`]. `M = 8` covers the multiply-add latency; `M = 1`
/// (decode) splits the sum over four accumulators instead.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn half8<const BF: bool, const M: usize>(
    g: *const u8,
    xs: &[ActRow<'_>; M],
    cols: Range<usize>,
    acc: &mut [__m256; M],
) {
    let kind = if BF { Float::BF16 } else { Float::F16 };
    // SAFETY: callers pass pointers with 16 readable bytes (one element of 8 rows).
    let load = |p: *const u8| unsafe { load8(kind, p) };
    if M == 1 {
        let x = xs[0].f.as_ptr();
        let mut part = [_mm256_setzero_ps(); 4];
        let mut i = cols.start;
        while i + 4 <= cols.end {
            // SAFETY: prefetching is a hint; an address past the group is never dereferenced.
            _mm_prefetch::<_MM_HINT_T0>(g.wrapping_add(16 * i + PREFETCH) as *const i8);
            for (u, a) in part.iter_mut().enumerate() {
                // SAFETY: the caller's guarantee (see q4_0x8).
                unsafe {
                    *a = _mm256_fmadd_ps(
                        _mm256_set1_ps(*x.add(i + u)),
                        load(g.add(16 * (i + u))),
                        *a,
                    );
                }
            }
            i += 4;
        }
        while i < cols.end {
            // SAFETY: as above.
            unsafe {
                part[0] = _mm256_fmadd_ps(_mm256_set1_ps(*x.add(i)), load(g.add(16 * i)), part[0]);
            }
            i += 1;
        }
        let sum = _mm256_add_ps(
            _mm256_add_ps(part[0], part[1]),
            _mm256_add_ps(part[2], part[3]),
        );
        acc[0] = _mm256_add_ps(acc[0], sum);
        return;
    }
    for i in cols {
        // SAFETY: the caller's guarantee (see q4_0x8).
        unsafe {
            let w = load(g.add(16 * i));
            for r in 0..M {
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(*xs[r].f.get_unchecked(i)), w, acc[r]);
            }
        }
    }
}

/// Widens the same columns of two interleaved f16 or bf16 groups (`g0`, `g1`: 16 bytes per
/// column, 8 rows each) into `buf`: per column, the 8 values of `g0`'s rows, then the 8 of
/// `g1`'s.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn widen_pair<const BF: bool>(g0: &[u8], g1: &[u8], buf: &mut [f32]) {
    let kl = buf.len() / 16;
    assert!(16 * kl <= g0.len().min(g1.len()), "columns out of range");
    let kind = if BF { Float::BF16 } else { Float::F16 };
    let (p0, p1, b) = (g0.as_ptr(), g1.as_ptr(), buf.as_mut_ptr());
    for kk in 0..kl {
        // SAFETY: column kk lies within both groups (asserted) and run kk within `buf`.
        unsafe {
            _mm256_storeu_ps(b.add(16 * kk), load8(kind, p0.add(16 * kk)));
            _mm256_storeu_ps(b.add(16 * kk + 8), load8(kind, p1.add(16 * kk)));
        }
    }
}

/// Widens the whole runs of eight f16 values (their bits) of `src` into `dst`; the caller
/// widens the rest.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) fn widen_halves(src: &[u16], dst: &mut [f32]) {
    for (s, d) in src.chunks_exact(8).zip(dst.chunks_exact_mut(8)) {
        // SAFETY: each chunk holds 8 readable halves and 8 writable floats.
        unsafe {
            let h = _mm_loadu_si128(s.as_ptr() as *const __m128i);
            _mm256_storeu_ps(d.as_mut_ptr(), _mm256_cvtph_ps(h));
        }
    }
}

/// A widened panel of 16 weight rows (`w`: per column 16 f32, from [`widen_pair`]) against a
/// tile of `M` activation rows packed column by column (`xp`: per column the `M` rows' values):
/// per activation row, the 16 partial dot products. Each broadcast value feeds two
/// multiply-adds; `M = 6` keeps twelve accumulators in flight. The cache lines of `ahead` (parts
/// of the next panel's weights) are asked for along the way, one every few columns, so that they
/// arrive without a burst of requests stalling the loop.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn panel16<const M: usize>(
    w: &[f32],
    xp: &[f32],
    ahead: [&[u8]; 2],
) -> [[f32; 16]; M] {
    let kl = w.len() / 16;
    assert!(xp.len() >= M * kl, "activation tile too short");
    let (wp, x) = (w.as_ptr(), xp.as_ptr());
    let mut a0 = [_mm256_setzero_ps(); M];
    let mut a1 = [_mm256_setzero_ps(); M];
    let mut lines = ahead[0].chunks(64).chain(ahead[1].chunks(64));
    let every = (kl / (ahead[0].len() + ahead[1].len()).div_ceil(64).max(1)).max(1);
    let mut countdown = every;
    for kk in 0..kl {
        countdown -= 1;
        if countdown == 0 {
            countdown = every;
            if let Some(line) = lines.next() {
                _mm_prefetch::<_MM_HINT_T1>(line.as_ptr() as *const i8);
            }
        }
        // SAFETY: kk < kl columns of the panel and of the tile (asserted).
        unsafe {
            let w0 = _mm256_loadu_ps(wp.add(16 * kk));
            let w1 = _mm256_loadu_ps(wp.add(16 * kk + 8));
            for r in 0..M {
                let xv = _mm256_broadcast_ss(&*x.add(M * kk + r));
                a0[r] = _mm256_fmadd_ps(xv, w0, a0[r]);
                a1[r] = _mm256_fmadd_ps(xv, w1, a1[r]);
            }
        }
    }
    for line in lines {
        _mm_prefetch::<_MM_HINT_T1>(line.as_ptr() as *const i8);
    }
    let (l0, l1) = (lanes(a0), lanes(a1));
    std::array::from_fn(|r| {
        let mut v = [0f32; 16];
        v[..8].copy_from_slice(&l0[r]);
        v[8..].copy_from_slice(&l1[r]);
        v
    })
}

/// Quantises `x` (a multiple of 32 values, all finite) to `q` with the scale `d` (`> 0`):
/// `q = round_ties_even(x / d)`, exactly as the scalar code does.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quantize_with_scale(x: &[f32], q: &mut [i8], d: f32) {
    let id = _mm256_set1_ps(1.0 / d);
    // packs_epi32 / packs_epi16 interleave 128-bit lanes; this puts the 32 values back in order.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (xb, qb) in x.chunks_exact(32).zip(q.chunks_exact_mut(32)) {
        // SAFETY: 32 values are read from `xb` and 32 bytes written to `qb`.
        unsafe {
            let p = xb.as_ptr();
            let r = |i: usize| {
                let v = _mm256_mul_ps(_mm256_loadu_ps(p.add(8 * i)), id);
                _mm256_cvtps_epi32(_mm256_round_ps::<
                    { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
                >(v))
            };
            let lo = _mm256_packs_epi32(r(0), r(1));
            let hi = _mm256_packs_epi32(r(2), r(3));
            let b = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(lo, hi), order);
            _mm256_storeu_si256(qb.as_mut_ptr() as *mut __m256i, b);
        }
    }
}

/// The largest magnitude in `x` (a multiple of 8 values), or `None` if any value is not finite.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn abs_max(x: &[f32]) -> Option<f32> {
    let sign = _mm256_set1_ps(-0.0);
    let inf = _mm256_set1_ps(f32::INFINITY);
    let mut m = _mm256_setzero_ps();
    let mut ok = _mm256_cmp_ps::<_CMP_EQ_OQ>(m, m);
    for c in x.chunks_exact(8) {
        // SAFETY: 8 values are read.
        let v = _mm256_andnot_ps(sign, unsafe { _mm256_loadu_ps(c.as_ptr()) });
        ok = _mm256_and_ps(ok, _mm256_cmp_ps::<_CMP_LT_OQ>(v, inf));
        m = _mm256_max_ps(m, v);
    }
    if _mm256_movemask_ps(ok) != 0xff {
        return None;
    }
    let s = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    Some(_mm_cvtss_f32(_mm_max_ss(s, _mm_shuffle_ps(s, s, 1))))
}

/// The two entry points to a set of interleaved kernels, compiled for `$features` (so the
/// kernels are inlined into them): `group_dots`, a whole group of eight rows of one type against
/// `M` activation rows (lanes as in [`q4_0x8`]), and `in_turn`, groups `gs[..live]` against
/// one activation row (a decode step) in turn, `chunk` block columns of each at a time (see
/// `QMatrix::decode_groups`), each group's sum kept in a register between turns. The integer
/// kernels are the given ones; half-precision groups always take [`half8`].
macro_rules! group_entry_points {
    ($features:literal, $q4_0:ident, $q8_0:ident, $q4k:ident, $q6k:ident) => {
        /// A whole interleaved group against `M` activation rows (see `group_entry_points`).
        #[target_feature(enable = $features)]
        #[inline]
        pub(crate) unsafe fn group_dots<const M: usize>(
            ty: crate::QType,
            g: &[u8],
            xs: [ActRow<'_>; M],
        ) -> [[f32; 8]; M] {
            use crate::QType;
            use crate::x86::half8;
            let (gp, cols) = (g.as_ptr(), 0..g.len() / (8 * ty.block_bytes()));
            let mut acc = [_mm256_setzero_ps(); M];
            // SAFETY: the caller passes a whole group and activation rows of its width.
            unsafe {
                match ty {
                    QType::Q4_0 => $q4_0::<M>(gp, &xs, cols, &mut acc),
                    QType::Q8_0 => $q8_0::<M>(gp, &xs, cols, &mut acc),
                    QType::Q4K => $q4k::<M>(gp, &xs, cols, &mut acc),
                    QType::Q6K => $q6k::<M>(gp, &xs, cols, &mut acc),
                    QType::F16 => half8::<false, M>(gp, &xs, cols, &mut acc),
                    QType::BF16 => half8::<true, M>(gp, &xs, cols, &mut acc),
                    QType::F32 => unreachable!("f32 rows are not interleaved"),
                }
            }
            crate::x86::lanes(acc)
        }

        /// Groups `gs[..live]` against one activation row, in turns (see
        /// `group_entry_points`).
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn in_turn<const S: usize>(
            ty: crate::QType,
            gs: [&[u8]; S],
            live: usize,
            x: ActRow<'_>,
            chunk: usize,
        ) -> [[f32; 8]; S] {
            use crate::QType;
            use crate::x86::half8;
            let n = x.f.len() / ty.block_elems();
            let xs = [x];
            let mut acc = [[_mm256_setzero_ps(); 1]; S];
            macro_rules! turns {
                ($kernel:expr) => {{
                    let mut b0 = 0;
                    while b0 < n {
                        let b1 = (b0 + chunk).min(n);
                        for s in 0..S {
                            if s < live {
                                // SAFETY: each group holds `n` block columns of this type, as
                                // many as the activation row.
                                unsafe { $kernel(gs[s].as_ptr(), &xs, b0..b1, &mut acc[s]) };
                            }
                        }
                        b0 = b1;
                    }
                }};
            }
            match ty {
                QType::Q4_0 => turns!($q4_0::<1>),
                QType::Q8_0 => turns!($q8_0::<1>),
                QType::Q4K => turns!($q4k::<1>),
                QType::Q6K => turns!($q6k::<1>),
                QType::F16 => turns!(half8::<false, 1>),
                QType::BF16 => turns!(half8::<true, 1>),
                QType::F32 => unreachable!("f32 rows are not interleaved"),
            }
            crate::x86::lanes(acc.map(|[a]| a))
        }
    };
}
pub(crate) use group_entry_points;

group_entry_points!("avx2,fma,f16c", q4_0x8, q8_0x8, q4kx8, q6kx8);
