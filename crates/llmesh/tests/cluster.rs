//! Clusters of real `llmesh run` processes on loopback: a model split over three nodes answers
//! exactly as one node does, through every node's API; a node with another cluster key is kept
//! out; a node killed mid-stream is replaced and the stream goes on unchanged; each node holds
//! only its layers in memory.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use serde_json::json;
use support::{TestNode, free_port, make_model, ready_plan, wait_for};

const KEY: &str = "test-cluster-key-0123456789";

/// Starts `n` nodes on loopback that know each other's addresses (no mDNS).
fn loopback_cluster(
    dir: &std::path::Path,
    model: &std::path::Path,
    n: usize,
    extra: &[&str],
) -> Vec<TestNode> {
    let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
    (0..n)
        .map(|i| {
            let mut args: Vec<String> = vec![
                "--model".into(),
                model.display().to_string(),
                "--listen".into(),
                format!("127.0.0.1:{}", ports[i]),
                "--no-discovery".into(),
                "--cluster-key".into(),
                KEY.into(),
            ];
            for (j, p) in ports.iter().enumerate() {
                if j != i {
                    args.push("--peer".into());
                    args.push(format!("127.0.0.1:{p}"));
                }
            }
            args.extend(extra.iter().map(|s| s.to_string()));
            TestNode::start(dir, &format!("node{i}"), "127.0.0.1", &args, None)
        })
        .collect()
}

fn completion(node: &TestNode, body: serde_json::Value) -> String {
    let r = node.post("/v1/completions", &body);
    assert_eq!(
        r.status,
        200,
        "{}: {}\n{}",
        node.name,
        r.body,
        node.log_text()
    );
    r.json()["choices"][0]["text"].as_str().unwrap().to_string()
}

fn single_node_text(model: &std::path::Path, prompt: &str, n: usize) -> String {
    let out = std::process::Command::new(support::bin())
        .args(["generate", "--model"])
        .arg(model)
        .args([
            "--prompt",
            prompt,
            "--max-tokens",
            &n.to_string(),
            "--temperature",
            "0",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["text"].as_str().unwrap().to_string()
}

#[test]
fn three_nodes_on_loopback_answer_as_one_node() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    make_model(&model, &["--arch", "llama", "--layers", "12"]);
    // Each node may hold about a third of the model, so the plan needs all three.
    let nodes = loopback_cluster(dir.path(), &model, 3, &["--memory-limit", "20MiB"]);
    let plans: Vec<_> = nodes
        .iter()
        .map(|n| {
            wait_for(
                &format!("{}'s plan", n.name),
                Duration::from_secs(90),
                || ready_plan(n),
            )
        })
        .collect();
    assert_eq!(plans[0].len(), 3, "{:?}", plans[0]);
    assert!(
        plans.iter().all(|p| *p == plans[0]),
        "nodes disagree on the plan: {plans:?}"
    );
    for prompt in ["The mesh of devices", "fn main() {"] {
        let want = single_node_text(&model, prompt, 24);
        for n in &nodes {
            let got = completion(
                n,
                json!({"model": "model", "prompt": prompt, "max_tokens": 24, "temperature": 0}),
            );
            assert_eq!(
                got, want,
                "{} answers differently from a single node",
                n.name
            );
        }
    }
    // The hop that ends a chain the entry does not run sends its answer straight to the entry:
    // with hops X → Y → Z, entry X takes Z's token and entry Z takes Y's activations; entry Y
    // calls X and Z itself, so nothing is delivered there.
    for n in &nodes {
        let taken = n.get("/v1/topology").unwrap()["sent"]["answers_delivered_here"]
            .as_u64()
            .unwrap();
        let middle = n.name == plans[0][1].0;
        assert_eq!(
            taken > 0,
            !middle,
            "{} took {taken} delivered answers; plan {:?}",
            n.name,
            plans[0]
        );
    }
    // Sampling with a seed gives the same text through every entry node.
    let sampled: Vec<String> = nodes
        .iter()
        .map(|n| completion(n, json!({"model": "model", "prompt": "Once", "max_tokens": 30, "temperature": 0.9, "seed": 11})))
        .collect();
    assert!(sampled.iter().all(|s| *s == sampled[0]), "{sampled:?}");
    // Requests in flight at once, through different entry nodes, do not mix.
    let alone: Vec<String> = (0..8)
        .map(|seed| completion(&nodes[0], json!({"model": "model", "prompt": "Once", "max_tokens": 20, "temperature": 1.0, "seed": seed})))
        .collect();
    let together: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|seed| {
                let node = &nodes[seed % 3];
                s.spawn(move || {
                    completion(node, json!({"model": "model", "prompt": "Once", "max_tokens": 20, "temperature": 1.0, "seed": seed}))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(together, alone);
}

#[test]
fn a_node_with_another_cluster_key_is_kept_out() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    make_model(&model, &["--arch", "qwen2", "--layers", "2"]);
    let (pa, pb) = (free_port(), free_port());
    let a = TestNode::start(
        dir.path(),
        "a",
        "127.0.0.1",
        &[
            "--model".into(),
            model.display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{pa}"),
            "--no-discovery".into(),
            "--cluster-key".into(),
            KEY.into(),
        ],
        None,
    );
    let b = TestNode::start(
        dir.path(),
        "b",
        "127.0.0.1",
        &[
            "--model".into(),
            model.display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{pb}"),
            "--peer".into(),
            format!("127.0.0.1:{pa}"),
            "--no-discovery".into(),
            "--cluster-key".into(),
            "a-completely-different-key".into(),
        ],
        None,
    );
    // Both sides log why.
    wait_for("the refusing side to log", Duration::from_secs(30), || {
        a.log_text()
            .contains("does not have this cluster's key")
            .then_some(())
    });
    wait_for("the dialling side to log", Duration::from_secs(30), || {
        b.log_text()
            .contains("uses a different cluster key")
            .then_some(())
    });
    // Neither ever sees the other.
    for n in [&a, &b] {
        let plan = wait_for("a plan", Duration::from_secs(30), || ready_plan(n));
        assert_eq!(plan.len(), 1, "{plan:?}");
        let topo = n.get("/v1/topology").unwrap();
        assert_eq!(
            topo["nodes"].as_array().unwrap().len(),
            1,
            "{}: {topo}",
            n.name
        );
        assert!(
            !n.log_text().contains("peer connected"),
            "{} connected: {}",
            n.name,
            n.log_text()
        );
    }
}

#[test]
fn a_killed_node_is_replaced_and_the_stream_goes_on_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    make_model(&model, &["--arch", "llama", "--layers", "12"]);
    // Any two nodes can hold the model; the plan uses two of the three.
    let mut nodes = loopback_cluster(dir.path(), &model, 3, &["--memory-limit", "32MiB"]);
    let plan = wait_for("a plan", Duration::from_secs(90), || ready_plan(&nodes[0]));
    assert_eq!(plan.len(), 2, "{plan:?}");
    let entry = nodes.iter().position(|n| n.name == plan[0].0).unwrap();
    let victim = nodes.iter().position(|n| n.name == plan[1].0).unwrap();
    let body = json!({"model": "model", "prompt": "The mesh", "max_tokens": 700, "temperature": 0.8, "seed": 3, "stream": true});
    let uninterrupted = support::stream_completion(&nodes[entry].http, &body, |_| {});
    let mut killed = false;
    let entry_addr = nodes[entry].http.clone();
    let replayed = support::stream_completion(&entry_addr, &body, |n| {
        if n == 20 && !killed {
            nodes[victim].kill();
            killed = true;
        }
    });
    assert!(killed);
    assert_eq!(
        replayed, uninterrupted,
        "the stream changed after the node died"
    );
    let log = nodes[entry].log_text();
    assert!(
        log.contains("re-planning without it") || log.contains("replaying"),
        "{log}"
    );
    let new_plan = wait_for("the new plan", Duration::from_secs(60), || {
        ready_plan(&nodes[entry])
    });
    assert!(
        new_plan
            .iter()
            .all(|(name, _, _)| *name != nodes[victim].name),
        "{new_plan:?}"
    );
}

#[test]
fn each_node_holds_only_its_layers_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    make_model(
        &model,
        &[
            "--arch",
            "llama",
            "--layers",
            "16",
            "--hidden",
            "512",
            "--heads",
            "8",
            "--kv-heads",
            "2",
            "--intermediate",
            "2048",
        ],
    );
    let weights: u64 = std::fs::metadata(model.join("model.safetensors"))
        .unwrap()
        .len();
    // The model's weights are 2.5 times any one node's limit.
    let limit = weights * 2 / 5;
    let nodes = loopback_cluster(
        dir.path(),
        &model,
        3,
        &[
            "--memory-limit",
            &limit.to_string(),
            "--kv-cache-tokens",
            "512",
        ],
    );
    let plan = wait_for("a plan", Duration::from_secs(120), || ready_plan(&nodes[0]));
    assert_eq!(plan.len(), 3, "{plan:?}");
    // One request through the whole pipeline, so every node has run its layers.
    completion(
        &nodes[0],
        json!({"model": "model", "prompt": "Hello", "max_tokens": 8, "temperature": 0}),
    );
    let topo = nodes[0].get("/v1/topology").unwrap();
    for n in &nodes {
        let report = topo["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == n.name.as_str())
            .unwrap();
        let shard_bytes = report["weight_bytes"].as_u64().unwrap();
        let kv_bytes = 512 * 16 * 1024; // reserved KV: 512 tokens × 16 layers × 1 KiB at most
        let peak = n.peak_rss();
        let limit = shard_bytes + kv_bytes + (150 << 20);
        eprintln!(
            "{}: layers {:?}, shard {:.1} MiB, peak RSS {:.1} MiB, limit {:.1} MiB (model {:.1} MiB)",
            n.name,
            report["shards"][0],
            shard_bytes as f64 / 1048576.0,
            peak as f64 / 1048576.0,
            limit as f64 / 1048576.0,
            weights as f64 / 1048576.0
        );
        assert!(
            peak > 0 && peak <= limit,
            "{} peak RSS {peak} > {limit}",
            n.name
        );
    }
}
