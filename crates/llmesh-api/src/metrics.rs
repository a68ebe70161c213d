//! Prometheus metrics: requests by endpoint and status, tokens in and out, time to first token,
//! decode speed, errors, and requests in flight. Rendered in the text exposition format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

const TTFT_BUCKETS: [f64; 11] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// Counters shared by all requests.
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    errors: AtomicU64,
    in_flight: AtomicI64,
    ttft: Mutex<Histogram>,
    decode: Mutex<(f64, u64, f64)>,
}

#[derive(Default)]
struct Histogram {
    counts: [u64; TTFT_BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Metrics {
    /// Counts a finished request.
    pub fn request(&self, endpoint: &'static str, status: u16) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((endpoint, status)).or_default() += 1;
        }
        if status >= 400 {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts tokens of a finished generation and its speeds.
    pub fn generation(&self, prompt: usize, completion: usize, ttft_s: f64, decode_tps: f64) {
        self.prompt_tokens
            .fetch_add(prompt as u64, Ordering::Relaxed);
        self.completion_tokens
            .fetch_add(completion as u64, Ordering::Relaxed);
        if let Ok(mut h) = self.ttft.lock() {
            for (i, b) in TTFT_BUCKETS.iter().enumerate() {
                if ttft_s <= *b {
                    h.counts[i] += 1;
                }
            }
            h.sum += ttft_s;
            h.count += 1;
        }
        if decode_tps > 0.0
            && let Ok(mut d) = self.decode.lock()
        {
            d.0 += decode_tps;
            d.1 += 1;
            d.2 = decode_tps;
        }
    }

    /// Marks a request as started; the guard marks it finished.
    pub fn start(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self)
    }

    /// The text exposition format.
    pub fn render(&self, queued: usize, running: usize) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# HELP llmesh_requests_total HTTP API requests by endpoint and status code."
        );
        let _ = writeln!(s, "# TYPE llmesh_requests_total counter");
        if let Ok(m) = self.requests.lock() {
            for ((endpoint, status), n) in m.iter() {
                let _ = writeln!(
                    s,
                    "llmesh_requests_total{{endpoint=\"{endpoint}\",code=\"{status}\"}} {n}"
                );
            }
        }
        let counter = |s: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        counter(
            &mut s,
            "llmesh_prompt_tokens_total",
            "Prompt tokens processed.",
            self.prompt_tokens.load(Ordering::Relaxed),
        );
        counter(
            &mut s,
            "llmesh_generated_tokens_total",
            "Tokens generated.",
            self.completion_tokens.load(Ordering::Relaxed),
        );
        counter(
            &mut s,
            "llmesh_errors_total",
            "Requests answered with an error status.",
            self.errors.load(Ordering::Relaxed),
        );
        let gauge = |s: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge(
            &mut s,
            "llmesh_requests_in_flight",
            "HTTP requests being answered.",
            self.in_flight.load(Ordering::Relaxed) as f64,
        );
        gauge(
            &mut s,
            "llmesh_requests_running",
            "Generations running on a worker.",
            running as f64,
        );
        gauge(
            &mut s,
            "llmesh_requests_queued",
            "Generations waiting for a worker.",
            queued as f64,
        );
        if let Ok(d) = self.decode.lock() {
            gauge(
                &mut s,
                "llmesh_decode_tokens_per_second",
                "Decode speed of the last finished generation.",
                d.2,
            );
            let avg = if d.1 > 0 { d.0 / d.1 as f64 } else { 0.0 };
            gauge(
                &mut s,
                "llmesh_decode_tokens_per_second_mean",
                "Mean decode speed over finished generations.",
                avg,
            );
        }
        if let Ok(h) = self.ttft.lock() {
            let _ = writeln!(
                s,
                "# HELP llmesh_time_to_first_token_seconds Time from request to first generated token."
            );
            let _ = writeln!(s, "# TYPE llmesh_time_to_first_token_seconds histogram");
            for (i, b) in TTFT_BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    s,
                    "llmesh_time_to_first_token_seconds_bucket{{le=\"{b}\"}} {}",
                    h.counts[i]
                );
            }
            let _ = writeln!(
                s,
                "llmesh_time_to_first_token_seconds_bucket{{le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(s, "llmesh_time_to_first_token_seconds_sum {}", h.sum);
            let _ = writeln!(s, "llmesh_time_to_first_token_seconds_count {}", h.count);
        }
        s
    }
}

/// Decrements the in-flight gauge when dropped.
pub struct InFlight<'a>(&'a Metrics);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
