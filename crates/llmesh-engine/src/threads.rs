//! The number of compute threads. candle's matrix multiplications read `RAYON_NUM_THREADS` on
//! every call and its quantized kernels run on rayon's global pool, so both are set together,
//! once, before any work starts.

use crate::error::{Error, Result};

/// Uses `n` threads for all tensor work in this process (`None`: one per core). Call before any
/// model is loaded, from a single-threaded program start.
pub fn set_compute_threads(n: Option<usize>) -> Result<usize> {
    let n = match n {
        Some(0) => return Err(Error::Invalid("--threads must be at least 1".into())),
        Some(n) => n,
        None => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
    };
    // SAFETY: called at program start, before this process starts any other thread, so no
    // other thread can be reading the environment concurrently.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    // Fails only if the pool was already built (e.g. in tests); the pool then keeps its size.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global();
    Ok(n)
}
