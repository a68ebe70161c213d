//! Portable kernels: the same integer arithmetic as the SIMD ones, one row at a time, for CPUs
//! without a SIMD path (and as a second implementation the tests compare with).

use crate::act::ActRow;
use crate::formats::{QType, half_at, q4k_scale_min, q6k_codes};

/// The dot product of one stored weight row with one activation row.
pub(crate) fn dot(ty: QType, w: &[u8], x: ActRow<'_>) -> f32 {
    match ty {
        QType::F32 => w
            .chunks_exact(4)
            .zip(x.f)
            .map(|(c, &v)| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * v)
            .sum(),
        QType::F16 => w
            .chunks_exact(2)
            .zip(x.f)
            .map(|(c, &v)| half::f16::from_le_bytes([c[0], c[1]]).to_f32() * v)
            .sum(),
        QType::BF16 => w
            .chunks_exact(2)
            .zip(x.f)
            .map(|(c, &v)| half::bf16::from_le_bytes([c[0], c[1]]).to_f32() * v)
            .sum(),
        QType::Q8_0 => w
            .chunks_exact(34)
            .zip(x.q.chunks_exact(32).zip(x.d))
            .map(|(b, (xq, &xd))| {
                let s: i32 = b[2..]
                    .iter()
                    .zip(xq)
                    .map(|(&w, &x)| i32::from(w as i8) * i32::from(x))
                    .sum();
                half_at(b, 0) * xd * s as f32
            })
            .sum(),
        QType::Q4_0 => w
            .chunks_exact(18)
            .zip(x.q.chunks_exact(32).zip(x.d))
            .map(|(b, (xq, &xd))| {
                let mut s = 0i32;
                for (i, &q) in b[2..18].iter().enumerate() {
                    s += (i32::from(q & 0x0f) - 8) * i32::from(xq[i]);
                    s += (i32::from(q >> 4) - 8) * i32::from(xq[i + 16]);
                }
                half_at(b, 0) * xd * s as f32
            })
            .sum(),
        QType::Q4K => {
            let mut total = 0f32;
            for (sb, b) in w.chunks_exact(144).enumerate() {
                let xq = &x.q[256 * sb..256 * sb + 256];
                let bs = &x.bsums[16 * sb..16 * sb + 16];
                let (d, dmin) = (half_at(b, 0), half_at(b, 2));
                let (scales, qs) = (&b[4..16], &b[16..144]);
                let (mut sum, mut mins) = (0i32, 0i32);
                for j in 0..8 {
                    let (sc, m) = q4k_scale_min(j, scales);
                    mins += i32::from(m) * (i32::from(bs[2 * j]) + i32::from(bs[2 * j + 1]));
                    let c = j / 2;
                    let mut s = 0i32;
                    for l in 0..32 {
                        let q = qs[32 * c + l];
                        let q = if j % 2 == 0 { q & 0x0f } else { q >> 4 };
                        s += i32::from(q) * i32::from(xq[32 * j + l]);
                    }
                    sum += i32::from(sc) * s;
                }
                total += x.d[sb] * (d * sum as f32 - dmin * mins as f32);
            }
            total
        }
        QType::Q6K => {
            let mut total = 0f32;
            for (sb, b) in w.chunks_exact(210).enumerate() {
                let xq = &x.q[256 * sb..256 * sb + 256];
                let bs = &x.bsums[16 * sb..16 * sb + 16];
                let mut sum = 0i32;
                for half in 0..2 {
                    let ql = &b[64 * half..64 * half + 64];
                    let qh = &b[128 + 32 * half..128 + 32 * half + 32];
                    let sc = &b[192 + 8 * half..192 + 8 * half + 8];
                    let xq = &xq[128 * half..128 * half + 128];
                    let mut s = [0i32; 8];
                    for l in 0..32 {
                        let is = l / 16;
                        for (g, code) in q6k_codes(ql, qh, l).into_iter().enumerate() {
                            s[is + 2 * g] += i32::from(code) * i32::from(xq[l + 32 * g]);
                        }
                    }
                    for k in 0..8 {
                        let scale = i32::from(sc[k] as i8);
                        sum += scale * (s[k] - 32 * i32::from(bs[8 * half + k]));
                    }
                }
                total += x.d[sb] * half_at(b, 208) * sum as f32;
            }
            total
        }
    }
}
