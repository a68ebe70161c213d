//! Facts about the machine.

/// Total physical memory, from `/proc/meminfo` (Linux); `None` elsewhere.
pub fn total_memory_bytes() -> Option<u64> {
    meminfo("MemTotal:")
}

/// Memory available for new allocations without swapping, from `/proc/meminfo` (Linux).
pub fn available_memory_bytes() -> Option<u64> {
    meminfo("MemAvailable:")
}

fn meminfo(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// This process's peak and current resident memory (`VmHWM`, `VmRSS`), Linux only.
pub fn process_memory_bytes() -> (Option<u64>, Option<u64>) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|v| v * 1024)
    };
    (kib("VmHWM:"), kib("VmRSS:"))
}

/// Keeps the C allocator from handing a step's large buffers (activations, products) back to
/// the kernel as soon as they are freed: by default glibc gives each buffer of a few MiB its own
/// mapping and trims the heap eagerly, so every step of a long prompt faulted in and zeroed
/// ~200 MB of fresh pages (about 3–4% of an F16 prefill). Buffers up to 32 MiB now come from
/// the heap, and up to 128 MiB of free heap is kept for the next step. Elsewhere, a no-op.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before other threads
    // allocate, and both values are within glibc's accepted ranges.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
    }
}
