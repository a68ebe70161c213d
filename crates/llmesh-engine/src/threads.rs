//! The number of compute threads. candle's matrix multiplications read `RAYON_NUM_THREADS` on
//! every call and its quantized kernels run on rayon's global pool, so both are set together,
//! once, before any work starts (with how long candle's own elementwise threads spin).

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
    // candle runs large elementwise ops on its own threads, which spin for 25,000 pause
    // instructions after each op before sleeping: with as many compute threads as cores, that
    // spinning competes with the next matrix product (its thread and work took ~2% of an F16
    // prefill's profile samples). A short spin still catches back-to-back ops (unless the user set a
    // limit).
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // SAFETY: as above.
        unsafe { std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "500") };
    }
    // Fails only if the pool was already built (e.g. in tests); the pool then keeps its size.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global();
    Ok(n)
}

/// Runs `job` on a compute thread, without waiting. A job that only computes (a pipeline hop's
/// layers) starts there at once instead of handing its work to the pool from another thread and
/// sleeping until it is done. Never give it a job that blocks on anything but compute.
pub fn spawn_compute(job: impl FnOnce() + Send + 'static) {
    rayon::spawn(job);
}
