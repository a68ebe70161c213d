//! Logging with `tracing`: `RUST_LOG` as usual, or `DEBUG=0..9` as exo users know it.

use tracing_subscriber::EnvFilter;

/// Sets up the global subscriber, writing to stderr.
pub fn init() {
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.is_empty() => EnvFilter::new(spec),
        _ => {
            let level = match std::env::var("DEBUG")
                .ok()
                .and_then(|d| d.parse::<u8>().ok())
            {
                None | Some(0) => "warn",
                Some(1) => "info",
                Some(2..=4) => "debug",
                Some(_) => "trace",
            };
            EnvFilter::new(format!("warn,llmesh={level},llmesh_engine={level}"))
        }
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
