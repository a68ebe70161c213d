//! `llmesh run`: start a node. It loads (or makes) the model description, joins the cluster
//! (mDNS and --peer), loads the layers the plan gives it, and serves the API and chat page until
//! Ctrl-C or SIGTERM.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use llmesh_api::AppState;
use llmesh_cluster::key::ClusterKey;
use llmesh_cluster::net::parse_address;
use llmesh_cluster::partition::Strategy;
use llmesh_cluster::wire::WireDtype;
use llmesh_cluster::{Node, NodeConfig};
use llmesh_engine::service::ModelHandle;
use llmesh_engine::synth::{SynthSpec, make_model};
use llmesh_engine::{Architecture, ModelFiles};

use crate::cli::RunArgs;

/// The data directory: `--data-dir`, else `$XDG_DATA_HOME/llmesh`, else `~/.local/share/llmesh`.
pub fn data_dir(arg: Option<PathBuf>) -> PathBuf {
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

/// Parses `8GiB`, `512 MiB`, `2.5GB`, `1000000`.
pub fn parse_bytes(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .with_context(|| format!("`{s}` is not a size (try 8GiB or 512MiB)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024f64.powi(4),
        other => bail!("`{other}` in `{s}` is not a size unit (use KiB, MiB, GiB, KB, MB or GB)"),
    };
    Ok((n * mult) as u64)
}

pub fn run(args: RunArgs) -> Result<()> {
    llmesh_engine::threads::set_compute_threads(args.threads)?;
    let data = data_dir(args.data_dir.clone());
    let (path, demo) = match &args.model {
        Some(p) => (p.clone(), false),
        None => (demo_model(&data)?, true),
    };
    let files = ModelFiles::open(&path)?.with_kv_type(args.kv_cache_type);
    let id = if demo {
        "demo".to_string()
    } else {
        files.name()
    };
    let mut handle = ModelHandle::from_files(&id, &files);
    handle.meta["demo"] = demo.into();
    let (cluster_key, new_key) = match (&args.cluster_key, &args.cluster_key_file) {
        (Some(k), _) => (ClusterKey::new(k).context("--cluster-key")?, false),
        (None, Some(f)) => (ClusterKey::from_file(f)?, false),
        (None, None) => ClusterKey::load_or_create(&data)?,
    };
    let keypair = llmesh_cluster::identity::load_or_create(&data)?;
    let listen = args
        .listen
        .iter()
        .map(|l| parse_address(l).map_err(|e| anyhow::anyhow!("--listen: {e}")))
        .collect::<Result<Vec<_>>>()?;
    let peers = args
        .peer
        .iter()
        .map(|p| parse_address(p).map_err(|e| anyhow::anyhow!("--peer: {e}")))
        .collect::<Result<Vec<_>>>()?;
    let memory_budget = match &args.memory_limit {
        Some(s) => parse_bytes(s).context("--memory-limit")?,
        None => llmesh_engine::system::available_memory_bytes().map_or(8 << 30, |a| a / 10 * 9),
    };
    let strategy = Strategy::from_name(&args.partitioner).ok_or_else(|| {
        anyhow::anyhow!(
            "--partitioner `{}` is not latency or memory-weighted",
            args.partitioner
        )
    })?;
    let wire_dtype = match &args.wire_dtype {
        Some(w) => Some(
            WireDtype::from_name(w)
                .ok_or_else(|| anyhow::anyhow!("--wire-dtype `{w}` is not f32, f16 or bf16"))?,
        ),
        None => None,
    };
    let node_name = args.node_name.clone().unwrap_or_else(hostname);
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
        let http = format!("http://{host}:{}", local.port());
        let node = Node::start(NodeConfig {
            files: Arc::new(files),
            handle,
            data_dir: data.clone(),
            keypair,
            cluster_key: cluster_key.clone(),
            listen,
            peers,
            mdns: !args.no_discovery,
            memory_budget,
            name: node_name,
            strategy,
            hop_seconds: args.hop_cost,
            wire_dtype,
            kv_tokens: args.kv_cache_tokens,
            parallel: args.parallel,
            queue: args.queue,
            http: Some(http.clone()),
            settle: Duration::from_secs_f64(args.settle.max(0.0)),
            speed_override: args.speed,
            plan_wait: Duration::from_secs(120),
        })
        .map_err(|e| anyhow::anyhow!(e))?;
        println!("llmesh serving `{id}` at {http}");
        println!("  chat page: {http}/   API: {http}/v1");
        println!("  node {} · cluster key fingerprint {}", node.peer_id(), cluster_key.fingerprint());
        if demo {
            println!("  `demo` is a tiny random model: its replies are noise. Serve a real one with `llmesh run --model path/to/model.gguf`.");
        }
        if new_key {
            println!("  a new cluster key was saved in {}", data.join("cluster.key").display());
            println!(
                "  to add another device, run there: llmesh run{} --cluster-key {}",
                args.model.as_ref().map(|p| format!(" --model {}", p.display())).unwrap_or_default(),
                cluster_key.as_str()
            );
        }
        if args.api_key.is_some() {
            println!("  API key required: send `Authorization: Bearer <key>`");
        }
        let state = AppState::new(Arc::new(node), args.api_key.clone());
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

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_parse() {
        assert_eq!(super::parse_bytes("8GiB").unwrap(), 8 << 30);
        assert_eq!(super::parse_bytes("512 MiB").unwrap(), 512 << 20);
        assert_eq!(super::parse_bytes("2.5GB").unwrap(), 2_500_000_000);
        assert_eq!(super::parse_bytes("1000").unwrap(), 1000);
        assert!(super::parse_bytes("lots").is_err());
        assert!(super::parse_bytes("3 parsecs").is_err());
    }
}
