//! The interleaved integer kernels again, for x86-64 CPUs with AVX-512 VNNI (AMD Zen 4 and
//! later, Intel Ice Lake and later): `vpdpbusd` multiplies unsigned by signed bytes and adds
//! each four products into a 32-bit lane in one instruction, where AVX2 needs `maddubs`, a
//! widening `madd` and an add. Still 256-bit registers (with VL): the eight rows of a group fill
//! one register's eight lanes, as in [`crate::x86`], and on Zen 4 a 512-bit operation costs two
//! 256-bit ones anyway.
//!
//! Since the products are summed in 32 bits, nothing saturates, which allows two tricks AVX2
//! cannot use:
//! * a high nibble is multiplied in place (`byte & 0xf0`, sixteen times the code) instead of
//!   being shifted down first; the factor 16 is taken out of the sum or folded into a scale;
//! * signed Q8_0 codes become unsigned by flipping their top bit (`code + 128`), and 128 × the
//!   block's activation sum is subtracted afterwards.
//!
//! Layouts, arguments and results are those of the AVX2 kernels (see [`crate::x86::q4_0x8`]).
//! Unlike them, these do not prefetch weights ahead: on a Zen 4 VM, decode of a Q4_K_M model ran
//! at 31.5 tok/s with these kernels issuing the AVX2 kernels' prefetches (a burst of requests
//! per block column) and 44.7 without them (medians of 6 rounds alternating in one process);
//! Q8_0 35.0 against 28.9, Q4_0 50.7 against 48.9. The hardware prefetcher keeps up on its own
//! there.
//!
//! Half-precision groups keep the AVX2 kernel: a 512-bit f16 decode kernel (two columns of the
//! eight rows per register) was slower on Zen 4, 39 against 51 GB/s per core on cached weights.

#![allow(clippy::missing_safety_doc, clippy::needless_range_loop)]

use std::arch::x86_64::*;
use std::ops::Range;

use crate::act::ActRow;
use crate::x86::{q4k_finish, q4k_header, q6k_codes};

crate::x86::group_entry_points!(
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    q4_0x8,
    q8_0x8,
    q4kx8,
    q6kx8
);

/// Whether this CPU has the features these kernels need (on top of [`crate::x86::available`]).
pub(crate) fn available() -> bool {
    crate::x86::available()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

/// Four bytes of `p` (unaligned) in every 32-bit lane.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn bcast4(p: *const i8) -> __m256i {
    // SAFETY: the caller guarantees four readable bytes at `p`.
    _mm256_set1_epi32(unsafe { std::ptr::read_unaligned(p as *const i32) })
}

/// Eight interleaved Q4_0 rows against `M` activation rows (as [`crate::x86::q4_0x8`]).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
pub(crate) unsafe fn q4_0x8<const M: usize>(
    g: *const u8,
    xs: &[ActRow<'_>; M],
    blocks: Range<usize>,
    acc: &mut [__m256; M],
) {
    let m4 = _mm256_set1_epi8(0x0f);
    let m4h = _mm256_set1_epi8(0xf0u8 as i8);
    for b in blocks {
        // SAFETY: the caller's guarantee (see crate::x86::q4_0x8).
        unsafe {
            let blk = g.add(b * 144);
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
            // Low nibbles: values 4c..4c + 4 of each row; high nibbles (sixteen times their
            // code): values 16 + 4c...
            let mut lo = [_mm256_setzero_si256(); M];
            let mut hi = [_mm256_setzero_si256(); M];
            for c in 0..4 {
                let v = _mm256_loadu_si256(blk.add(16 + 32 * c) as *const __m256i);
                let (l, h) = (_mm256_and_si256(v, m4), _mm256_and_si256(v, m4h));
                for r in 0..M {
                    let x = xs[r].q.as_ptr().add(32 * b + 4 * c);
                    lo[r] = _mm256_dpbusd_epi32(lo[r], l, bcast4(x));
                    hi[r] = _mm256_dpbusd_epi32(hi[r], h, bcast4(x.add(16)));
                }
            }
            for r in 0..M {
                // Σ code·x = lo + hi / 16; the codes carry an offset of 8: less 8 × Σ x.
                let i = _mm256_sub_epi32(
                    _mm256_add_epi32(lo[r], _mm256_srai_epi32::<4>(hi[r])),
                    _mm256_set1_epi32(8 * *xs[r].sums.get_unchecked(b)),
                );
                acc[r] = crate::x86::add_scaled(acc[r], dw, *xs[r].d.get_unchecked(b), i);
            }
        }
    }
}

/// Eight interleaved Q8_0 rows against `M` activation rows (as [`crate::x86::q4_0x8`]).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
pub(crate) unsafe fn q8_0x8<const M: usize>(
    g: *const u8,
    xs: &[ActRow<'_>; M],
    blocks: Range<usize>,
    acc: &mut [__m256; M],
) {
    let flip = _mm256_set1_epi8(0x80u8 as i8);
    for b in blocks {
        // SAFETY: the caller's guarantee (see crate::x86::q4_0x8).
        unsafe {
            let blk = g.add(b * 272);
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
            // Two sums per row (even and odd chunks), so no chunk waits for the one before.
            let mut s = [[_mm256_setzero_si256(); 2]; M];
            for c in 0..8 {
                let w = _mm256_loadu_si256(blk.add(16 + 32 * c) as *const __m256i);
                // code + 128, as an unsigned byte.
                let u = _mm256_xor_si256(w, flip);
                for r in 0..M {
                    let x = xs[r].q.as_ptr().add(32 * b + 4 * c);
                    s[r][c & 1] = _mm256_dpbusd_epi32(s[r][c & 1], u, bcast4(x));
                }
            }
            for r in 0..M {
                let i = _mm256_sub_epi32(
                    _mm256_add_epi32(s[r][0], s[r][1]),
                    _mm256_set1_epi32(128 * *xs[r].sums.get_unchecked(b)),
                );
                acc[r] = crate::x86::add_scaled(acc[r], dw, *xs[r].d.get_unchecked(b), i);
            }
        }
    }
}

/// `pshufb` controls that move byte `j` of each row's 4-byte group (rows 0..4 of a 128-bit lane)
/// to the bottom of that row's 32-bit lane, zero-extended.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
fn byte_controls() -> [__m256i; 4] {
    std::array::from_fn(|j| {
        let mut c = [0x80u8 as i8; 32];
        for lane in 0..2 {
            for r in 0..4 {
                c[16 * lane + 4 * r] = (4 * r + j) as i8;
            }
        }
        // SAFETY: an unaligned load of a 32-byte local array.
        unsafe { _mm256_loadu_si256(c.as_ptr() as *const __m256i) }
    })
}

/// Eight interleaved Q4_K rows against `M` activation rows (as [`crate::x86::q4kx8`]).
///
/// A sub-block's codes are summed against the activations in 32 bits, then multiplied by the
/// rows' 6-bit scales (`vpmulld`); a high-nibble sub-block is summed at sixteen times its codes,
/// so the low-nibble one takes sixteen times its scale and the whole super-block's sum is taken
/// back by 1/16 with `d`. The largest sum, 16 × 8 × 63 × 32 × 15 × 127, fits in 31 bits.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
pub(crate) unsafe fn q4kx8<const M: usize>(
    g: *const u8,
    xs: &[ActRow<'_>; M],
    blocks: Range<usize>,
    acc: &mut [__m256; M],
) {
    let m4 = _mm256_set1_epi8(0x0f);
    let m4h = _mm256_set1_epi8(0xf0u8 as i8);
    let ctrl = byte_controls();
    let sixteenth = _mm256_set1_ps(1.0 / 16.0);
    for sb in blocks {
        // SAFETY: the caller's guarantee (see crate::x86::q4_0x8).
        unsafe {
            let blk = g.add(sb * 1152);
            let h = q4k_header(blk);
            // Sub-block j's scale of each row, in the row's 32-bit lane.
            let scale =
                |j: usize| _mm256_shuffle_epi8(if j < 4 { h.sc_lo } else { h.sc_hi }, ctrl[j % 4]);
            let codes = blk.add(128);
            let mut isum = [_mm256_setzero_si256(); M];
            for ch in 0..4 {
                // Sub-blocks 2ch (low nibbles) and 2ch + 1 (high nibbles, × 16).
                let mut s_lo = [[_mm256_setzero_si256(); 2]; M];
                let mut s_hi = [[_mm256_setzero_si256(); 2]; M];
                for q in 0..8 {
                    let v = _mm256_loadu_si256(codes.add(32 * (8 * ch + q)) as *const __m256i);
                    let (lo, hi) = (_mm256_and_si256(v, m4), _mm256_and_si256(v, m4h));
                    // One row has two sums per sub-block; several rows are enough apart.
                    let k = if M == 1 { q & 1 } else { 0 };
                    for r in 0..M {
                        let x = xs[r].q.as_ptr().add(256 * sb + 64 * ch + 4 * q);
                        s_lo[r][k] = _mm256_dpbusd_epi32(s_lo[r][k], lo, bcast4(x));
                        s_hi[r][k] = _mm256_dpbusd_epi32(s_hi[r][k], hi, bcast4(x.add(32)));
                    }
                }
                let sc_a = _mm256_slli_epi32::<4>(scale(2 * ch));
                let sc_b = scale(2 * ch + 1);
                for r in 0..M {
                    let lo = _mm256_add_epi32(s_lo[r][0], s_lo[r][1]);
                    let hi = _mm256_add_epi32(s_hi[r][0], s_hi[r][1]);
                    let p = _mm256_add_epi32(
                        _mm256_mullo_epi32(lo, sc_a),
                        _mm256_mullo_epi32(hi, sc_b),
                    );
                    isum[r] = _mm256_add_epi32(isum[r], p);
                }
            }
            q4k_finish(&h, _mm256_mul_ps(h.d, sixteenth), &isum, xs, sb, acc);
        }
    }
}

/// Eight interleaved Q6_K rows against `M` activation rows (as [`crate::x86::q6kx8`], whose
/// code layout this reads): each 16-value sub-block's codes are summed against the activations
/// in 32 bits and multiplied by the rows' 8-bit scales (`vpmulld`).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
pub(crate) unsafe fn q6kx8<const M: usize>(
    g: *const u8,
    xs: &[ActRow<'_>; M],
    blocks: Range<usize>,
    acc: &mut [__m256; M],
) {
    for sb in blocks {
        // SAFETY: the caller's guarantee (see crate::x86::q4_0x8).
        unsafe {
            let blk = g.add(sb * 1680);
            let d = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
            // Sub-scale j of the eight rows, one per 32-bit lane.
            let scale = |j: usize| {
                _mm256_cvtepi8_epi32(_mm_loadl_epi64(blk.add(16 + 8 * j) as *const __m128i))
            };
            let codes = blk.add(144);
            let mut isum = [_mm256_setzero_si256(); M];
            for n in 0..2 {
                // Sub-block 8n + 2q + h is positions 16h..16h + 16 of quarter q: runs of four
                // positions cp = 2h and 2h + 1.
                for h in 0..2 {
                    // Per run, positions 8cp..8cp+4 and 8cp+4..8cp+8 of each quarter.
                    let mut cs = [[[_mm256_setzero_si256(); 4]; 2]; 2];
                    for (c, cs) in cs.iter_mut().enumerate() {
                        for (half, cs) in cs.iter_mut().enumerate() {
                            *cs = q6k_codes(codes.add(96 * (8 * n + 2 * (2 * h + c) + half)));
                        }
                    }
                    for q in 0..4 {
                        let sc = scale(8 * n + 2 * q + h);
                        for r in 0..M {
                            let x = xs[r].q.as_ptr().add(256 * sb + 128 * n + 32 * q + 16 * h);
                            let mut t = _mm256_setzero_si256();
                            for c in 0..2 {
                                for half in 0..2 {
                                    let xv = bcast4(x.add(8 * c + 4 * half));
                                    t = _mm256_dpbusd_epi32(t, cs[c][half][q], xv);
                                }
                            }
                            isum[r] = _mm256_add_epi32(isum[r], _mm256_mullo_epi32(t, sc));
                        }
                    }
                }
            }
            // The codes carry an offset of 32: subtract 32 × Σ scale × (sum of 16 activations),
            // with the rows' scales widened to 16 bits, two sub-blocks per multiply-add.
            let mut pairs = [_mm256_setzero_si256(); 8];
            for p in 0..8 {
                // Scales 2p and 2p + 1 of each row, side by side in its lane.
                pairs[p] = _mm256_or_si256(
                    _mm256_and_si256(scale(2 * p), _mm256_set1_epi32(0xffff)),
                    _mm256_slli_epi32::<16>(scale(2 * p + 1)),
                );
            }
            for r in 0..M {
                let bs = xs[r].bsums.as_ptr().add(16 * sb);
                let mut off = _mm256_setzero_si256();
                for (p, pair) in pairs.iter().enumerate() {
                    let b = bcast4(bs.add(2 * p) as *const i8);
                    off = _mm256_add_epi32(off, _mm256_madd_epi16(*pair, b));
                }
                let s = _mm256_sub_epi32(isum[r], _mm256_slli_epi32(off, 5));
                let dx = _mm256_set1_ps(*xs[r].d.get_unchecked(sb));
                acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(d, dx), _mm256_cvtepi32_ps(s), acc[r]);
            }
        }
    }
}
