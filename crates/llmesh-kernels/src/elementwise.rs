//! Element-wise steps between the products of a layer, on rayon's pool (the threads the
//! products run on) instead of a separate pool, and fused so each value is read once.

use rayon::prelude::*;

use crate::KernelError;

/// Values per parallel task: below two of these the work runs on the calling thread.
const CHUNK: usize = 16 * 1024;

/// `gate[i] = silu(gate[i]) × up[i]` (SwiGLU: `silu(x) = x / (1 + e^-x)`), in place.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) -> Result<(), KernelError> {
    if gate.len() != up.len() {
        return Err(KernelError::Operands {
            rows: 1,
            cols: gate.len(),
            what: format!("{} gate and {} up values", gate.len(), up.len()),
        });
    }
    let run = |(g, u): (&mut [f32], &[f32])| {
        for (g, u) in g.iter_mut().zip(u) {
            *g = *g / (1.0 + (-*g).exp()) * u;
        }
    };
    if gate.len() < 2 * CHUNK {
        run((gate, up));
    } else {
        gate.par_chunks_mut(CHUNK)
            .zip(up.par_chunks(CHUNK))
            .for_each(run);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn silu_mul_matches_the_definition_in_both_paths() {
        for n in [1, 7, 2 * CHUNK + 5] {
            let g: Vec<f32> = (0..n).map(|i| (i % 97) as f32 / 8.0 - 6.0).collect();
            let u: Vec<f32> = (0..n).map(|i| (i % 13) as f32 / 4.0 - 1.5).collect();
            let mut out = g.clone();
            silu_mul(&mut out, &u).unwrap();
            for i in 0..n {
                let x = g[i] as f64;
                let want = x / (1.0 + (-x).exp()) * u[i] as f64;
                assert!(
                    (out[i] as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()),
                    "n {n} value {i}: {} vs {want}",
                    out[i]
                );
            }
        }
        let mut g = vec![f32::NEG_INFINITY, f32::INFINITY, f32::NAN];
        silu_mul(&mut g, &[1.0, 1.0, 1.0]).unwrap();
        assert!(g[0] == 0.0 || g[0].is_nan(), "silu(-inf)");
        assert_eq!(g[1], f32::INFINITY);
        assert!(g[2].is_nan());
        assert!(silu_mul(&mut [0.0; 3], &[0.0; 2]).is_err());
    }
}
