//! NEON kernels for 64-bit Arm (Apple silicon, Graviton, Ampere, Raspberry Pi). Each computes one
//! weight row, in the file's layout, against `M` activation rows at once, so a weight block is
//! loaded and unpacked once for up to four rows of a prompt; with `M = 1` it is the decode path.
//!
//! Integer products are signed 8-bit dot products, as in llama.cpp's Arm path: `sdot` where the
//! CPU has the Armv8.2 dot-product extension (every Apple M chip, Neoverse N1 and later,
//! Cortex-A76 and later), widening multiplies with pairwise adds where it does not (Cortex-A72,
//! as in the Raspberry Pi 4). Codes are made signed before the product (Q4_0 −8, Q6_K −32), so
//! no block sums are needed. NEON is part of every AArch64 CPU; only `sdot` is looked up at run
//! time.
//!
//! Half-precision values are widened with `fcvtl`/`fcvt` (base Armv8, no FP16 arithmetic
//! needed); the Rust intrinsics that would name them are not stable, hence the inline assembly.

#![allow(clippy::needless_range_loop)]

use std::arch::aarch64::*;
use std::arch::asm;
use std::sync::OnceLock;

use crate::act::ActRow;
use crate::formats::{QType, q4k_scale_min};

/// Whether this CPU has the dot-product extension (`sdot`).
fn has_sdot() -> bool {
    static SDOT: OnceLock<bool> = OnceLock::new();
    *SDOT.get_or_init(|| std::arch::is_aarch64_feature_detected!("dotprod"))
}

/// `acc` plus the products of 16 signed bytes of weights and 16 of activations, summed in
/// fours: with `sdot` (`SDOT`, only where [`has_sdot`] holds) one instruction; otherwise two
/// widening multiplies (a product of two i8 fits in 16 bits) and two pairwise add-accumulates
/// into 32 bits. Which lane holds which partial sum differs between the two: callers only use
/// a vector's total, or scale the whole vector by one sub-block's scale.
#[target_feature(enable = "neon")]
#[inline]
fn dot<const SDOT: bool>(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    if SDOT {
        let mut r = acc;
        // SAFETY: `sdot` only reads and writes the named vector registers; SDOT is set only
        // where has_sdot() confirmed that the CPU has it.
        unsafe {
            asm!(
                ".arch_extension dotprod",
                "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
                acc = inout(vreg) r,
                a = in(vreg) a,
                b = in(vreg) b,
                options(pure, nomem, nostack, preserves_flags),
            );
        }
        r
    } else {
        let lo = vmull_s8(vget_low_s8(a), vget_low_s8(b));
        let hi = vmull_high_s8(a, b);
        vpadalq_s16(vpadalq_s16(acc, lo), hi)
    }
}

/// An f16 (its bits) widened.
#[target_feature(enable = "neon")]
#[inline]
fn f16_to_f32(bits: u16) -> f32 {
    let r: f32;
    // SAFETY: a register-to-register conversion.
    unsafe {
        asm!(
            "fcvt {r:s}, {h:h}",
            r = out(vreg) r,
            h = in(vreg) bits,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    r
}

/// The f16 stored at `b[at..at + 2]`, widened.
#[target_feature(enable = "neon")]
#[inline]
fn half_at(b: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[at], b[at + 1]]))
}

/// Eight f16 values widened: the low four, then the high four.
#[target_feature(enable = "neon")]
#[inline]
fn widen_f16x8(h: uint16x8_t) -> (float32x4_t, float32x4_t) {
    let (lo, hi): (float32x4_t, float32x4_t);
    // SAFETY: register-to-register conversions.
    unsafe {
        asm!(
            "fcvtl {lo:v}.4s, {h:v}.4h",
            "fcvtl2 {hi:v}.4s, {h:v}.8h",
            lo = out(vreg) lo,
            hi = out(vreg) hi,
            h = in(vreg) h,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    (lo, hi)
}

/// Widens the whole runs of eight f16 values (their bits) of `src` into `dst`; the caller
/// widens the rest.
#[target_feature(enable = "neon")]
pub(crate) fn widen_halves(src: &[u16], dst: &mut [f32]) {
    for (s, d) in src.chunks_exact(8).zip(dst.chunks_exact_mut(8)) {
        // SAFETY: each chunk holds 8 readable halves and 8 writable floats.
        unsafe {
            let (lo, hi) = widen_f16x8(vld1q_u16(s.as_ptr()));
            vst1q_f32(d.as_mut_ptr(), lo);
            vst1q_f32(d.as_mut_ptr().add(4), hi);
        }
    }
}

/// 16 bytes of `b` from `at`, as unsigned bytes.
#[target_feature(enable = "neon")]
#[inline]
fn load_u8(b: &[u8], at: usize) -> uint8x16_t {
    let s = &b[at..at + 16];
    // SAFETY: `s` holds 16 readable bytes.
    unsafe { vld1q_u8(s.as_ptr()) }
}

/// 16 activation codes of `q` from `at`.
#[target_feature(enable = "neon")]
#[inline]
fn load_i8(q: &[i8], at: usize) -> int8x16_t {
    let s = &q[at..at + 16];
    // SAFETY: `s` holds 16 readable bytes.
    unsafe { vld1q_s8(s.as_ptr()) }
}

/// Four f32 of `f` from `at`.
#[target_feature(enable = "neon")]
#[inline]
fn load_f32(f: &[f32], at: usize) -> float32x4_t {
    let s = &f[at..at + 4];
    // SAFETY: `s` holds 4 readable values.
    unsafe { vld1q_f32(s.as_ptr()) }
}

/// One weight row of type `ty` (file layout) against `M` activation rows.
pub(crate) fn dots<const M: usize>(ty: QType, w: &[u8], xs: [ActRow<'_>; M]) -> [f32; M] {
    // SAFETY: NEON is part of every AArch64 CPU (and of every AArch64 target Rust builds for
    // with std).
    unsafe {
        if has_sdot() {
            dots_with::<true, M>(ty, w, xs)
        } else {
            dots_with::<false, M>(ty, w, xs)
        }
    }
}

#[target_feature(enable = "neon")]
fn dots_with<const SDOT: bool, const M: usize>(
    ty: QType,
    w: &[u8],
    xs: [ActRow<'_>; M],
) -> [f32; M] {
    match ty {
        QType::Q8_0 => q_32::<false, SDOT, M>(w, xs),
        QType::Q4_0 => q_32::<true, SDOT, M>(w, xs),
        QType::Q4K => q4k::<SDOT, M>(w, xs),
        QType::Q6K => q6k::<SDOT, M>(w, xs),
        QType::F32 | QType::F16 | QType::BF16 => float::<M>(ty, w, xs),
    }
}

/// The products of 32 codes (`c.0` then `c.1`) with the 32 activation codes of `x` from `at`,
/// summed in fours.
#[target_feature(enable = "neon")]
#[inline]
fn dot32<const SDOT: bool>(c: (int8x16_t, int8x16_t), x: &[i8], at: usize) -> int32x4_t {
    let s = dot::<SDOT>(vdupq_n_s32(0), c.0, load_i8(x, at));
    dot::<SDOT>(s, c.1, load_i8(x, at + 16))
}

/// The 32 signed codes of one Q8_0 block, or of one Q4_0 block (low nibbles are values 0..16,
/// high ones 16..32; offset by 8).
#[target_feature(enable = "neon")]
#[inline]
fn codes_32<const Q4: bool>(blk: &[u8]) -> (int8x16_t, int8x16_t) {
    if Q4 {
        let v = load_u8(blk, 2);
        let eight = vdupq_n_s8(8);
        (
            vsubq_s8(vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0f))), eight),
            vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8::<4>(v)), eight),
        )
    } else {
        (
            vreinterpretq_s8_u8(load_u8(blk, 2)),
            vreinterpretq_s8_u8(load_u8(blk, 18)),
        )
    }
}

/// Q8_0 or Q4_0 weights (blocks of an f16 scale and 32 codes) against 8-bit activation
/// blocks; each row's blocks are scaled and summed in four float lanes, reduced once at the
/// end.
#[target_feature(enable = "neon")]
fn q_32<const Q4: bool, const SDOT: bool, const M: usize>(
    w: &[u8],
    xs: [ActRow<'_>; M],
) -> [f32; M] {
    let bb = if Q4 { 18 } else { 34 };
    let mut acc = [vdupq_n_f32(0.0); M];
    for (b, blk) in w.chunks_exact(bb).enumerate() {
        let d = half_at(blk, 0);
        let codes = codes_32::<Q4>(blk);
        for r in 0..M {
            let s = dot32::<SDOT>(codes, xs[r].q, 32 * b);
            acc[r] = vfmaq_n_f32(acc[r], vcvtq_f32_s32(s), d * xs[r].d[b]);
        }
    }
    acc.map(|a| vaddvq_f32(a))
}

/// Q4_K weights: super-blocks of 256 values in 8 sub-blocks of 32, each with a 6-bit scale and
/// min; chunk `c` of the 128 code bytes holds sub-block `2c` in its low nibbles and `2c + 1`
/// in its high ones.
#[target_feature(enable = "neon")]
fn q4k<const SDOT: bool, const M: usize>(w: &[u8], xs: [ActRow<'_>; M]) -> [f32; M] {
    let mut total = [0f32; M];
    let m4 = vdupq_n_u8(0x0f);
    for (sb, blk) in w.chunks_exact(144).enumerate() {
        let (d, dmin) = (half_at(blk, 0), half_at(blk, 2));
        let scales = &blk[4..16];
        let sm: [(u8, u8); 8] = std::array::from_fn(|j| q4k_scale_min(j, scales));
        let mut acc = [vdupq_n_s32(0); M];
        for c in 0..4 {
            let (v0, v1) = (load_u8(blk, 16 + 32 * c), load_u8(blk, 32 + 32 * c));
            // Nibbles are 0..16: as signed bytes they keep their value.
            let (lo0, lo1, hi0, hi1) = (
                vreinterpretq_s8_u8(vandq_u8(v0, m4)),
                vreinterpretq_s8_u8(vandq_u8(v1, m4)),
                vreinterpretq_s8_u8(vshrq_n_u8::<4>(v0)),
                vreinterpretq_s8_u8(vshrq_n_u8::<4>(v1)),
            );
            let (s_lo, s_hi) = (i32::from(sm[2 * c].0), i32::from(sm[2 * c + 1].0));
            for r in 0..M {
                let x = xs[r].q;
                let at = 256 * sb + 64 * c;
                let p_lo = dot32::<SDOT>((lo0, lo1), x, at);
                let p_hi = dot32::<SDOT>((hi0, hi1), x, at + 32);
                acc[r] = vmlaq_n_s32(vmlaq_n_s32(acc[r], p_lo, s_lo), p_hi, s_hi);
            }
        }
        for r in 0..M {
            let bs = &xs[r].bsums[16 * sb..16 * sb + 16];
            let mins: i32 = (0..8)
                .map(|j| i32::from(sm[j].1) * (i32::from(bs[2 * j]) + i32::from(bs[2 * j + 1])))
                .sum();
            total[r] += xs[r].d[sb] * (d * vaddvq_s32(acc[r]) as f32 - dmin * mins as f32);
        }
    }
    total
}

/// Q6_K weights: super-blocks of 256 values as two halves of 128, each position's 6-bit code
/// split into 4 low bits (`ql`) and 2 high bits (`qh`), offset by 32, with a signed 8-bit
/// scale per 16 values (see `formats::q6k_codes` for the bit layout).
#[target_feature(enable = "neon")]
fn q6k<const SDOT: bool, const M: usize>(w: &[u8], xs: [ActRow<'_>; M]) -> [f32; M] {
    let mut total = [0f32; M];
    let (m4, m30, off) = (vdupq_n_u8(0x0f), vdupq_n_u8(0x30), vdupq_n_s8(32));
    for (sb, blk) in w.chunks_exact(210).enumerate() {
        let d = half_at(blk, 208);
        let mut acc = [vdupq_n_s32(0); M];
        for half in 0..2 {
            let (ql, qh) = (64 * half, 128 + 32 * half);
            let sc = &blk[192 + 8 * half..200 + 8 * half];
            for p in 0..2 {
                let a = load_u8(blk, ql + 16 * p);
                let b = load_u8(blk, ql + 32 + 16 * p);
                let h = load_u8(blk, qh + 16 * p);
                let codes = [
                    vorrq_u8(vandq_u8(a, m4), vandq_u8(vshlq_n_u8::<4>(h), m30)),
                    vorrq_u8(vandq_u8(b, m4), vandq_u8(vshlq_n_u8::<2>(h), m30)),
                    vorrq_u8(vshrq_n_u8::<4>(a), vandq_u8(h, m30)),
                    vorrq_u8(vshrq_n_u8::<4>(b), vandq_u8(vshrq_n_u8::<2>(h), m30)),
                ]
                // Codes are 0..64: as signed bytes they keep their value.
                .map(|q| vsubq_s8(vreinterpretq_s8_u8(q), off));
                for r in 0..M {
                    let x = xs[r].q;
                    for (g, &q) in codes.iter().enumerate() {
                        let at = 256 * sb + 128 * half + 32 * g + 16 * p;
                        let s = dot::<SDOT>(vdupq_n_s32(0), q, load_i8(x, at));
                        // Positions l = 16p..16p + 16 of quarter g: sub-block 2g + p.
                        acc[r] = vmlaq_n_s32(acc[r], s, i32::from(sc[2 * g + p] as i8));
                    }
                }
            }
        }
        for r in 0..M {
            total[r] += xs[r].d[sb] * d * vaddvq_s32(acc[r]) as f32;
        }
    }
    total
}

/// Eight weights of a float row from element `i` (f32, f16 or bf16), widened.
#[target_feature(enable = "neon")]
#[inline]
fn load_w8(ty: QType, w: &[u8], i: usize) -> (float32x4_t, float32x4_t) {
    match ty {
        QType::F32 => {
            let s = &w[4 * i..4 * i + 32];
            // SAFETY: `s` holds 8 readable f32 (unaligned loads are allowed).
            unsafe {
                (
                    vld1q_f32(s.as_ptr() as *const f32),
                    vld1q_f32(s.as_ptr().add(16) as *const f32),
                )
            }
        }
        _ => {
            let s = &w[2 * i..2 * i + 16];
            // SAFETY: `s` holds 8 readable 16-bit values.
            let h = unsafe { vld1q_u16(s.as_ptr() as *const u16) };
            if ty == QType::BF16 {
                // A bf16 is the top half of an f32.
                (
                    vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(h))),
                    vreinterpretq_f32_u32(vshll_high_n_u16::<16>(h)),
                )
            } else {
                widen_f16x8(h)
            }
        }
    }
}

/// Float weights (f32, f16 or bf16) against f32 activations, 8 columns a step with two
/// accumulators per row; a tail of fewer than 8 columns is done by the portable kernel.
#[target_feature(enable = "neon")]
fn float<const M: usize>(ty: QType, w: &[u8], xs: [ActRow<'_>; M]) -> [f32; M] {
    let es = if ty == QType::F32 { 4 } else { 2 };
    let k = w.len() / es;
    let main = k / 8 * 8;
    let mut a0 = [vdupq_n_f32(0.0); M];
    let mut a1 = [vdupq_n_f32(0.0); M];
    for i in (0..main).step_by(8) {
        let (w0, w1) = load_w8(ty, w, i);
        for r in 0..M {
            let x = xs[r].f;
            a0[r] = vfmaq_f32(a0[r], w0, load_f32(x, i));
            a1[r] = vfmaq_f32(a1[r], w1, load_f32(x, i + 4));
        }
    }
    let mut out = [0f32; M];
    for r in 0..M {
        out[r] = vaddvq_f32(vaddq_f32(a0[r], a1[r]));
        if main < k {
            out[r] += crate::portable::dot(
                ty,
                &w[main * es..],
                ActRow {
                    f: &xs[r].f[main..],
                    ..xs[r]
                },
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both ways of taking a 16-byte dot product give the exact integer total, extremes
    /// included (−128 × −128 in every position); `sdot` is checked where the CPU has it.
    #[test]
    fn dot_products_are_exact() {
        let mut cases: Vec<([i8; 16], [i8; 16])> =
            vec![([-128; 16], [-128; 16]), ([127; 16], [-128; 16])];
        let mut state = 0x9e37_79b9_u32;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as i8
        };
        for _ in 0..100 {
            cases.push((
                std::array::from_fn(|_| next()),
                std::array::from_fn(|_| next()),
            ));
        }
        for (a, b) in cases {
            let want: i32 = a
                .iter()
                .zip(&b)
                .map(|(&x, &y)| i32::from(x) * i32::from(y))
                .sum::<i32>()
                + 7;
            // SAFETY: NEON is part of every AArch64 CPU; SDOT only where has_sdot() holds;
            // the arrays hold 16 bytes each.
            unsafe {
                let (va, vb) = (vld1q_s8(a.as_ptr()), vld1q_s8(b.as_ptr()));
                let acc = vsetq_lane_s32::<2>(7, vdupq_n_s32(0));
                assert_eq!(vaddvq_s32(dot::<false>(acc, va, vb)), want);
                if has_sdot() {
                    assert_eq!(vaddvq_s32(dot::<true>(acc, va, vb)), want);
                }
            }
        }
    }

    /// The assembly conversions agree with the `half` crate on every f16 bit pattern (NaNs
    /// stay NaN).
    #[test]
    fn half_conversions_match_the_format() {
        for bits in 0..=u16::MAX {
            let want = half::f16::from_bits(bits).to_f32();
            // SAFETY: NEON is part of every AArch64 CPU.
            let (got, lane) = unsafe {
                let (lo, hi) = widen_f16x8(vdupq_n_u16(bits));
                (
                    f16_to_f32(bits),
                    [vgetq_lane_f32::<0>(lo), vgetq_lane_f32::<3>(hi)],
                )
            };
            for v in [got, lane[0], lane[1]] {
                assert!(
                    v.to_bits() == want.to_bits() || (v.is_nan() && want.is_nan()),
                    "{bits:#06x}"
                );
            }
        }
    }
}
