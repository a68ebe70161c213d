//! Three nodes in three network namespaces joined by a bridge, started without any peer
//! address, find each other by mDNS within 10 seconds and answer as one node does. Needs root
//! (network namespaces); without it the test says so and does nothing.
#![allow(clippy::unwrap_used)]

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use support::{TestNode, agreed_plan, make_model, wait_for, wait_for_nodes};

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("the `ip` command (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A bridge and three namespaces with an `eth0` on it each; removed on drop.
struct Lan {
    bridge: String,
    namespaces: Vec<String>,
    subnet: String,
}

impl Lan {
    fn new(n: usize) -> Lan {
        let tag = std::process::id() % 200 + 20;
        let bridge = format!("llbr{tag}");
        let subnet = format!("10.231.{tag}");
        let _ = Command::new("ip").args(["link", "del", &bridge]).output();
        ip(&["link", "add", &bridge, "type", "bridge"]);
        ip(&["addr", "add", &format!("{subnet}.254/24"), "dev", &bridge]);
        ip(&["link", "set", &bridge, "up"]);
        let mut lan = Lan {
            bridge,
            namespaces: Vec::new(),
            subnet,
        };
        for i in 1..=n {
            let ns = format!("llns{tag}x{i}");
            let veth = format!("llv{tag}x{i}");
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
            ip(&["netns", "add", &ns]);
            lan.namespaces.push(ns.clone());
            ip(&[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ]);
            ip(&["link", "set", &veth, "master", &lan.bridge, "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}.{i}/24", lan.subnet),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            // mDNS multicast leaves through eth0.
            ip(&["-n", &ns, "route", "add", "224.0.0.0/4", "dev", "eth0"]);
        }
        lan
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
    }
}

#[test]
fn nodes_in_namespaces_find_each_other_by_mdns() {
    // SAFETY-free check of the effective user id via /proc.
    let uid = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        .unwrap_or_default();
    if uid != "0" {
        eprintln!("SKIPPED: network namespaces need root (uid {uid})");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    make_model(&model, &["--arch", "qwen3", "--layers", "12"]);
    let lan = Lan::new(3);
    let started = Instant::now();
    let nodes: Vec<TestNode> = lan
        .namespaces
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            let args: Vec<String> = vec![
                "--model".into(),
                model.display().to_string(),
                "--listen".into(),
                "0.0.0.0:47480".into(),
                "--cluster-key".into(),
                "namespace-test-cluster-key".into(),
                "--memory-limit".into(),
                "30MiB".into(),
                "--kv-cache-tokens".into(),
                "512".into(),
            ];
            TestNode::start(
                dir.path(),
                &format!("ns{}", i + 1),
                &format!("{}.{}", lan.subnet, i + 1),
                &args,
                Some(ns),
            )
        })
        .collect();
    for n in &nodes {
        wait_for(
            &format!("{} to see all three nodes", n.name),
            Duration::from_secs(10),
            || {
                let t = n.get("/v1/topology")?;
                (t["nodes"].as_array()?.len() == 3).then_some(())
            },
        );
    }
    let found = started.elapsed();
    eprintln!(
        "all three nodes found each other {:.1} s after starting",
        found.as_secs_f64()
    );
    assert!(found < Duration::from_secs(10), "{found:?}");
    let plan = wait_for_nodes(
        "one plan on all nodes",
        Duration::from_secs(60),
        &nodes,
        || agreed_plan(&nodes),
    );
    assert!(
        plan.len() >= 2,
        "the model should need more than one node: {plan:?}"
    );
    let out = Command::new(support::bin())
        .args(["generate", "--model"])
        .arg(&model)
        .args([
            "--prompt",
            "Hello from the LAN",
            "--max-tokens",
            "20",
            "--temperature",
            "0",
            "--json",
        ])
        .output()
        .unwrap();
    let want: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for n in &nodes {
        let r = n.post("/v1/completions", &json!({"model": "model", "prompt": "Hello from the LAN", "max_tokens": 20, "temperature": 0}));
        assert_eq!(
            r.status,
            200,
            "{}: {}\n{}",
            n.name,
            r.body,
            support::describe(&nodes)
        );
        assert_eq!(
            r.json()["choices"][0]["text"],
            want["text"],
            "{} differs",
            n.name
        );
    }
}
