//! `llmesh bench`: prefill and decode speed of one model on this machine (median and spread over
//! repeats), peak memory, and decode speed as a fraction of the memory bandwidth measured in the
//! same run; with `--cluster N`, time to first token, time per output token and bytes per hop of
//! a pipeline of N local nodes against one node, through the HTTP API.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use llmesh_engine::{GenerateRequest, KvType, LocalRunner, ModelFiles, SamplingParams, StepRunner};
use serde_json::{Value, json};

use crate::cli::{BandwidthArgs, BenchArgs};

fn bench_model(data: &Path) -> Result<PathBuf> {
    let dir = data.join("bench-model");
    let gguf = dir.join("model-q8_0.gguf");
    if gguf.is_file() && ModelFiles::open(&gguf).is_ok() {
        return Ok(gguf);
    }
    eprintln!(
        "making the synthetic bench model in {} (once)",
        dir.display()
    );
    // In a child process, so that making it does not count in this process's peak memory.
    let status = Command::new(std::env::current_exe()?)
        .args([
            "dev",
            "make-model",
            "--arch",
            "llama",
            "--layers",
            "16",
            "--hidden",
            "1024",
            "--heads",
            "16",
        ])
        .args([
            "--kv-heads",
            "4",
            "--intermediate",
            "2816",
            "--context",
            "4096",
            "--gguf",
            "q8_0",
            "--out",
        ])
        .arg(&dir)
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("could not make the bench model in {}", dir.display());
    }
    Ok(gguf)
}

fn median_spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// Memory read bandwidth in bytes per second: the best of a few parallel sums over 1 GiB.
/// `llmesh dev bandwidth`: prints the measured bandwidth in bytes per second.
pub fn bandwidth(args: BandwidthArgs) -> Result<()> {
    llmesh_engine::threads::set_compute_threads(args.threads)?;
    println!("{}", measure_bandwidth());
    Ok(())
}

/// The memory bandwidth measured by `llmesh dev bandwidth` with `threads` threads, in a child
/// process: its 1 GiB buffer does not count in this process's peak memory, and it can run
/// next to each decode run (this machine's speed may drift between runs).
fn bandwidth_now(threads: usize) -> Result<f64> {
    let out = Command::new(std::env::current_exe()?)
        .args(["dev", "bandwidth", "--threads", &threads.to_string()])
        .stderr(Stdio::inherit())
        .output()
        .context("running `llmesh dev bandwidth`")?;
    let text = String::from_utf8_lossy(&out.stdout);
    match text.trim().parse::<f64>() {
        Ok(b) if out.status.success() && b > 0.0 => Ok(b),
        _ => bail!("`llmesh dev bandwidth` failed ({}): {text}", out.status),
    }
}

/// The best of a few parallel reads of 1 GiB, each thread's 512 KiB pieces read both front to
/// back as one stream and as eight streams in step. A core keeps more reads in flight over
/// several streams than over one, on some machines by a quarter (the kernels' mat-vecs read two
/// streams), so one stream alone would understate what the memory can deliver.
fn measure_bandwidth() -> f64 {
    use rayon::prelude::*;
    let n = (1usize << 30) / 8;
    // In huge pages where the kernel allows, as the weights are (`huge_page_buffer`).
    let mut buf = llmesh_engine::system::huge_page_buffer::<u64>(n);
    buf.extend(0..n as u64);
    let mut best = 0f64;
    for pass in 0..6 {
        let streams = if pass % 2 == 0 { 1 } else { 8 };
        let t0 = Instant::now();
        let s: u64 = buf
            .par_chunks(1 << 16)
            .map(|c| sum_streams(c, streams))
            .reduce(|| 0, u64::wrapping_add);
        let dt = t0.elapsed().as_secs_f64();
        std::hint::black_box(s);
        best = best.max((n * 8) as f64 / dt);
    }
    best
}

/// The wrapping sum of `c`, read as `streams` equal parts in step, eight values of each at a
/// time (`c.len()` a multiple of `8 * streams`).
fn sum_streams(c: &[u64], streams: usize) -> u64 {
    let parts: Vec<&[u64]> = c.chunks_exact(c.len() / streams).collect();
    let mut acc = [0u64; 8];
    for i in (0..c.len() / streams).step_by(8) {
        for p in &parts {
            for (a, x) in acc.iter_mut().zip(&p[i..i + 8]) {
                *a = a.wrapping_add(*x);
            }
        }
    }
    acc.iter().fold(0, |a, &x| a.wrapping_add(x))
}

pub fn run(args: BenchArgs) -> Result<()> {
    let threads = llmesh_engine::threads::set_compute_threads(args.threads)?;
    let data = super::run::data_dir(args.data_dir.clone());
    let model = match &args.model {
        Some(m) => m.clone(),
        None => bench_model(&data)?,
    };
    if args.repeat == 0 || args.gen_tokens < 2 || args.prompt_tokens == 0 {
        bail!(
            "--repeat must be at least 1, --gen-tokens at least 2 and --prompt-tokens at least 1"
        );
    }
    match args.cluster {
        Some(n) => cluster(&args, &model, n, threads),
        None => single(&args, &model, threads),
    }
}

fn single(args: &BenchArgs, model: &Path, threads: usize) -> Result<()> {
    let files = ModelFiles::open(model)?.with_kv_type(args.kv_cache_type);
    let cfg = files.config().clone();
    if args.prompt_tokens + args.gen_tokens > cfg.max_position_embeddings {
        bail!(
            "--prompt-tokens + --gen-tokens exceed the model's context of {}",
            cfg.max_position_embeddings
        );
    }
    let shard = files.load_full()?;
    let prompt: Vec<u32> = (0..args.prompt_tokens)
        .map(|i| ((i * 7919 + 11) % cfg.vocab_size) as u32)
        .collect();
    let mut req = GenerateRequest::new(prompt.clone(), args.gen_tokens);
    req.sampling = SamplingParams::greedy();
    // Every weight is read once per decoded token, except the embedding (one row).
    let embed = if cfg.tie_word_embeddings {
        0.0
    } else {
        shard.embedding_bytes() as f64
    };
    let read_per_token = shard.weight_bytes() as f64 - embed;
    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    let mut bandwidths = Vec::new();
    let mut fractions = Vec::new();
    // Probed before the first decode run and after each one: a run's fraction is of the mean of
    // the probes on either side of it (a shared machine's bandwidth drifts over seconds).
    let mut probe_before = bandwidth_now(threads)?;
    for _ in 0..args.repeat {
        let mut runner = LocalRunner::new(&shard, &req)?;
        let t0 = Instant::now();
        let mut next = None;
        let chunks = prompt.chunks(512).count();
        for (i, c) in prompt.chunks(512).enumerate() {
            next = runner.step(c, i + 1 == chunks)?.sampled;
        }
        prefill.push(args.prompt_tokens as f64 / t0.elapsed().as_secs_f64());
        let t1 = Instant::now();
        for _ in 1..args.gen_tokens {
            let id = next.take().map(|s| s.id).unwrap_or(0);
            next = runner.step(&[id], true)?.sampled;
        }
        let rate = (args.gen_tokens - 1) as f64 / t1.elapsed().as_secs_f64();
        decode.push(rate);
        let probe_after = bandwidth_now(threads)?;
        let bw = (probe_before + probe_after) / 2.0;
        probe_before = probe_after;
        bandwidths.push(bw);
        fractions.push(read_per_token * rate / bw);
    }
    let (pf, pf_lo, pf_hi) = median_spread(prefill);
    let (dc, dc_lo, dc_hi) = median_spread(decode);
    let (peak, _) = llmesh_engine::system::process_memory_bytes();
    let (bandwidth, bw_lo, bw_hi) = median_spread(bandwidths);
    let (fraction, fr_lo, fr_hi) = median_spread(fractions);
    let out = json!({
        "model": model.display().to_string(),
        "threads": threads,
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "repeat": args.repeat,
        "prefill_tokens_per_s": pf,
        "prefill_tokens_per_s_range": [pf_lo, pf_hi],
        "decode_tokens_per_s": dc,
        "decode_tokens_per_s_range": [dc_lo, dc_hi],
        "weight_bytes": shard.weight_bytes(),
        "kv_cache_type": args.kv_cache_type.to_string(),
        "peak_rss_bytes": peak,
        "memory_bandwidth_bytes_per_s": bandwidth,
        "memory_bandwidth_bytes_per_s_range": [bw_lo, bw_hi],
        "bandwidth_fraction": fraction,
        "bandwidth_fraction_range": [fr_lo, fr_hi],
    });
    if args.json {
        println!("{out}");
    } else {
        println!("model      {}", model.display());
        println!("threads    {threads}");
        println!("KV cache   {}", args.kv_cache_type);
        println!(
            "prefill    {pf:8.1} tok/s  (min {pf_lo:.1}, max {pf_hi:.1}; {} tokens, {} runs)",
            args.prompt_tokens, args.repeat
        );
        println!(
            "decode     {dc:8.1} tok/s  (min {dc_lo:.1}, max {dc_hi:.1}; {} tokens)",
            args.gen_tokens
        );
        println!(
            "weights    {:8.1} MiB",
            shard.weight_bytes() as f64 / 1048576.0
        );
        println!(
            "peak RSS   {:8.1} MiB",
            peak.unwrap_or(0) as f64 / 1048576.0
        );
        println!(
            "bandwidth  {:8.1} GB/s measured (min {:.1}, max {:.1}; mean of the probes before \
             and after each decode run)",
            bandwidth / 1e9,
            bw_lo / 1e9,
            bw_hi / 1e9
        );
        println!(
            "decode     reads {:.1} GB/s of weights = {:.0}% of the bandwidth measured around \
             it (min {:.0}%, max {:.0}%)",
            read_per_token * dc / 1e9,
            fraction * 100.0,
            fr_lo * 100.0,
            fr_hi * 100.0
        );
    }
    Ok(())
}

struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn get_json(addr: &str, path: &str) -> Option<Value> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut s, &mut text).ok()?;
    let (_, body) = text.split_once("\r\n\r\n")?;
    serde_json::from_str(body).ok()
}

/// Streams one completion; returns (time to first event, time from first event to the end).
fn timed_stream(addr: &str, body: &Value) -> Result<(f64, f64)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(600)))?;
    let b = body.to_string();
    let t0 = Instant::now();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
        b.len()
    )?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    let mut first = None;
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            bail!("the stream ended early");
        }
        if line.starts_with("HTTP/1.1 ") && !line.contains(" 200 ") {
            bail!("the node answered {}", line.trim());
        }
        let Some(data) = line.trim_end().strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        if data.contains("\"error\"") {
            bail!("error: {data}");
        }
        first.get_or_insert_with(Instant::now);
    }
    let first = first.context("no tokens came back")?;
    Ok(((first - t0).as_secs_f64(), first.elapsed().as_secs_f64()))
}

/// A local cluster of `nodes` processes started for the benchmark.
struct LocalCluster {
    nodes: usize,
    http: Vec<u16>,
    entry: String,
    model_id: String,
    _children: Children,
}

impl LocalCluster {
    fn start(
        exe: &Path,
        model: &Path,
        nodes: usize,
        threads: usize,
        kv: KvType,
        data: &Path,
    ) -> Result<LocalCluster> {
        let ports: Vec<(u16, u16)> = (0..nodes)
            .map(|_| Ok((free_port()?, free_port()?)))
            .collect::<Result<_>>()?;
        let mut children = Children(Vec::new());
        for (i, (http, p2p)) in ports.iter().enumerate() {
            let mut cmd = Command::new(exe);
            cmd.args(["run", "--model"])
                .arg(model)
                .args([
                    "--host",
                    "127.0.0.1",
                    "--port",
                    &http.to_string(),
                    "--listen",
                    &format!("127.0.0.1:{p2p}"),
                ])
                .args([
                    "--no-discovery",
                    "--cluster-key",
                    // A key per cluster size: the clusters run side by side and must not merge.
                    &format!("llmesh-bench-cluster-key-{nodes}"),
                    "--partitioner",
                    "memory-weighted",
                    "--kv-cache-type",
                    &kv.to_string(),
                ])
                .args([
                    "--threads",
                    &threads.to_string(),
                    "--node-name",
                    &format!("bench{nodes}-{i}"),
                    "--parallel",
                    "1",
                ])
                .arg("--data-dir")
                .arg(data.join(format!("n{nodes}-{i}")))
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            for (j, (_, p)) in ports.iter().enumerate() {
                if j != i {
                    cmd.args(["--peer", &format!("127.0.0.1:{p}")]);
                }
            }
            children.0.push(cmd.spawn()?);
        }
        let entry = format!("127.0.0.1:{}", ports[0].0);
        let start = Instant::now();
        loop {
            let hops = get_json(&entry, "/v1/topology")
                .and_then(|t| t["plan"].as_array().map(|p| p.len()))
                .unwrap_or(0);
            let healthy = get_json(&entry, "/healthcheck").is_some_and(|h| h["status"] == "ok");
            if hops == nodes && healthy {
                break;
            }
            if start.elapsed() > Duration::from_secs(300) {
                bail!("{nodes} node(s) did not form a plan in 5 minutes");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let model_id = get_json(&entry, "/v1/models")
            .and_then(|m| m["data"][0]["id"].as_str().map(str::to_string))
            .context("no model")?;
        Ok(LocalCluster {
            nodes,
            http: ports.iter().map(|(h, _)| *h).collect(),
            entry,
            model_id,
            _children: children,
        })
    }

    /// Bytes of activations and tokens all nodes have sent to each other so far.
    fn bytes_sent(&self) -> u64 {
        self.http
            .iter()
            .filter_map(|h| get_json(&format!("127.0.0.1:{h}"), "/v1/topology"))
            .map(|t| t["sent"]["bytes"].as_u64().unwrap_or(0))
            .sum()
    }

    /// One streamed completion: (time to first token, time per later token).
    fn measure(&self, prompt: &[u32], gen_tokens: usize) -> Result<(f64, f64)> {
        let body = json!({"model": self.model_id, "prompt": prompt, "max_tokens": gen_tokens,
            "temperature": 0, "ignore_eos": true, "stream": true});
        let (first, rest) = timed_stream(&self.entry, &body)?;
        Ok((first, rest / (gen_tokens - 1) as f64))
    }
}

fn cluster(args: &BenchArgs, model: &Path, n: usize, threads: usize) -> Result<()> {
    if n < 2 {
        bail!("--cluster needs at least 2 nodes");
    }
    let exe = std::env::current_exe()?;
    let tmp = std::env::temp_dir().join(format!("llmesh-bench-{}", std::process::id()));
    let files = ModelFiles::open(model)?;
    let vocab = files.config().vocab_size;
    let prompt: Vec<u32> = (0..args.prompt_tokens)
        .map(|i| ((i * 7919 + 11) % vocab) as u32)
        .collect();
    // Both clusters run side by side (the idle one only exchanges heartbeats) and take turns,
    // so a machine whose speed drifts over minutes slows both alike.
    let clusters = [
        LocalCluster::start(&exe, model, 1, threads, args.kv_cache_type, &tmp)?,
        LocalCluster::start(&exe, model, n, threads, args.kv_cache_type, &tmp)?,
    ];
    for c in &clusters {
        // Warm up (loads pages, fills caches).
        c.measure(&prompt[..prompt.len().min(16)], 4)?;
    }
    let sent_before: Vec<u64> = clusters.iter().map(LocalCluster::bytes_sent).collect();
    let mut times: [Vec<(f64, f64)>; 2] = [Vec::new(), Vec::new()];
    for r in 0..args.repeat {
        let order = if r % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            times[i].push(clusters[i].measure(&prompt, args.gen_tokens)?);
        }
    }
    let mut rows = Vec::new();
    for (i, c) in clusters.iter().enumerate() {
        let hop_boundaries = c.nodes - 1;
        let tokens = (args.prompt_tokens + args.gen_tokens) * args.repeat;
        let bytes_per_hop_token = if hop_boundaries > 0 {
            (c.bytes_sent() - sent_before[i]) as f64 / (hop_boundaries * tokens) as f64
        } else {
            0.0
        };
        let (ttft_m, _, _) = median_spread(times[i].iter().map(|t| t.0).collect());
        let (tpot_m, tpot_lo, tpot_hi) = median_spread(times[i].iter().map(|t| t.1).collect());
        rows.push(json!({
            "nodes": c.nodes,
            "time_to_first_token_s": ttft_m,
            "time_per_output_token_s": tpot_m,
            "time_per_output_token_range_s": [tpot_lo, tpot_hi],
            "decode_tokens_per_s": 1.0 / tpot_m,
            "bytes_per_hop_per_token": bytes_per_hop_token,
        }));
    }
    drop(clusters);
    let _ = std::fs::remove_dir_all(&tmp);
    // Each round measures both clusters back to back: the ratio within a round cancels the
    // machine's drift over minutes, and the median over rounds discards a disturbed one.
    let (ratio, ratio_lo, ratio_hi) = median_spread(
        times[0]
            .iter()
            .zip(&times[1])
            .map(|(one, n)| one.1 / n.1)
            .collect(),
    );
    let out = json!({"model": model.display().to_string(), "threads": threads, "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens, "repeat": args.repeat, "runs": rows, "decode_ratio": ratio,
        "decode_ratio_range": [ratio_lo, ratio_hi]});
    if args.json {
        println!("{out}");
    } else {
        println!(
            "model {} · {} prompt + {} generated tokens · median of {} · {threads} threads per node",
            model.display(),
            args.prompt_tokens,
            args.gen_tokens,
            args.repeat
        );
        println!(
            "{:>5} {:>12} {:>12} {:>12} {:>16}",
            "nodes", "TTFT ms", "TPOT ms", "decode tok/s", "bytes/hop/token"
        );
        for r in &rows {
            println!(
                "{:>5} {:>12.1} {:>12.2} {:>12.1} {:>16.0}",
                r["nodes"],
                r["time_to_first_token_s"].as_f64().unwrap_or(0.0) * 1e3,
                r["time_per_output_token_s"].as_f64().unwrap_or(0.0) * 1e3,
                r["decode_tokens_per_s"].as_f64().unwrap_or(0.0),
                r["bytes_per_hop_per_token"].as_f64().unwrap_or(0.0)
            );
        }
        println!(
            "decode speed, {n} nodes ÷ 1 node: {ratio:.3} (median of the {} rounds' ratios; min {ratio_lo:.3}, max {ratio_hi:.3})",
            args.repeat
        );
    }
    Ok(())
}
