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
