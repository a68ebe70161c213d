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

/// An empty vector with room for `capacity` values whose memory the kernel is asked to back
/// with transparent huge pages (2 MiB on x86-64) where it allows that (`madvise` mode, the
/// default of many distributions, does only when asked). A decode step streams every weight,
/// and with 4 KiB pages that is a page-table walk per 4 KiB, which on a virtual machine walks
/// two levels of tables. Advice only: where the kernel declines, or elsewhere than Linux, the
/// pages are ordinary ones. Only whole pages inside the buffer are advised, and before any of
/// them is touched, so they are allocated huge on first write.
pub fn huge_page_buffer<T>(capacity: usize) -> Vec<T> {
    let v: Vec<T> = Vec::with_capacity(capacity);
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let at = v.as_ptr() as usize;
        let start = at.div_ceil(PAGE) * PAGE;
        let end = (at + v.capacity() * std::mem::size_of::<T>()) / PAGE * PAGE;
        if end >= start + (2 << 20) {
            // SAFETY: the range is whole pages inside the vector's own allocation; the advice
            // changes how the pages are backed, never their contents or the mapping's extent.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    v
}
