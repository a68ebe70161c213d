//! `llmesh run`: load a model (or make the demo model) and serve the API and chat page until
//! Ctrl-C or SIGTERM.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use llmesh_api::AppState;
use llmesh_engine::service::{LocalService, ModelHandle};
use llmesh_engine::synth::{SynthSpec, make_model};
use llmesh_engine::{Architecture, ModelFiles};

use crate::cli::RunArgs;

/// The data directory: `--data-dir`, else `$XDG_DATA_HOME/llmesh`, else `~/.local/share/llmesh`.
fn data_dir(arg: Option<PathBuf>) -> PathBuf {
    arg.or_else(|| std::env::var_os("XDG_DATA_HOME").map(|d| PathBuf::from(d).join("llmesh")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share/llmesh")))
        .unwrap_or_else(|| std::env::temp_dir().join("llmesh"))
}

/// The demo model: a tiny random Llama with a real tokenizer and chat template, made once.
fn demo_model(data: &std::path::Path) -> Result<PathBuf> {
    let dir = data.join("demo");
    if ModelFiles::open(&dir).is_ok() {
        return Ok(dir);
    }
    let mut spec = SynthSpec::new(Architecture::Llama);
    spec.layers = 4;
    spec.context = 4096;
    make_model(&spec, &dir)
        .with_context(|| format!("making the demo model in {}", dir.display()))?;
    Ok(dir)
}

pub fn run(args: RunArgs) -> Result<()> {
    llmesh_engine::threads::set_compute_threads(args.threads)?;
    let (path, demo) = match &args.model {
        Some(p) => (p.clone(), false),
        None => (demo_model(&data_dir(args.data_dir.clone()))?, true),
    };
    let files = ModelFiles::open(&path)?;
    let id = if demo {
        "demo".to_string()
    } else {
        files.name()
    };
    let shard = files
        .load_full()
        .with_context(|| format!("loading {}", path.display()))?;
    let mut handle = ModelHandle::from_files(&id, &files);
    handle.meta["demo"] = demo.into();
    let node_name = args.node_name.clone().unwrap_or_else(hostname);
    let weight_mib = shard.weight_bytes() as f64 / (1 << 20) as f64;
    let service = LocalService::new(handle, shard, args.parallel, args.queue, node_name);
    let state = AppState::new(Arc::new(service), args.api_key.clone());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (is another server using the port? try --port)"))?;
        let local = listener.local_addr()?;
        let host = if local.ip().is_unspecified() { "localhost".to_string() } else { local.ip().to_string() };
        println!("llmesh serving `{id}` ({weight_mib:.1} MiB of weights) at http://{host}:{}", local.port());
        println!("  chat page: http://{host}:{}/   API: http://{host}:{}/v1", local.port(), local.port());
        if demo {
            println!("  `demo` is a tiny random model: its replies are noise. Serve a real one with `llmesh run --model path/to/model.gguf`.");
        }
        if args.api_key.is_some() {
            println!("  API key required: send `Authorization: Bearer <key>`");
        }
        llmesh_api::serve(listener, state, shutdown_signal()).await?;
        println!("llmesh stopped");
        anyhow::Ok(())
    })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "this node".into())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down: finishing requests in flight");
}
