//! Helpers for tests that start real `llmesh` processes: a tiny HTTP client, nodes as child
//! processes with their own data directories, and waiting for conditions.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// An HTTP response.
pub struct Response {
    pub status: u16,
    pub body: String,
}

impl Response {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// One HTTP/1.1 request over a fresh connection.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> std::io::Result<Response> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(300)))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    Ok(Response { status, body })
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

/// A streaming completion: calls `on_event` with each SSE data payload; returns the joined text.
pub fn stream_completion(addr: &str, body: &Value, mut on_event: impl FnMut(usize)) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    let b = body.to_string();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
        b.len()
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let mut text = String::new();
    let mut n = 0;
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).unwrap() == 0 {
            break;
        }
        let Some(data) = line.trim_end().strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let v: Value =
            serde_json::from_str(data).unwrap_or_else(|e| panic!("bad event {data}: {e}"));
        if let Some(err) = v.get("error") {
            panic!("error event: {err}");
        }
        if let Some(t) = v["choices"][0]["text"].as_str() {
            text.push_str(t);
        }
        n += 1;
        on_event(n);
    }
    text
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_llmesh")
}

/// Makes a model with `llmesh dev make-model`.
pub fn make_model(out: &Path, args: &[&str]) {
    let st = Command::new(bin())
        .args(["dev", "make-model", "--out"])
        .arg(out)
        .args(args)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A node running as a child process.
pub struct TestNode {
    pub child: Option<Child>,
    pub http: String,
    pub log: PathBuf,
    pub name: String,
}

impl TestNode {
    /// Starts `llmesh run` with `args` (plus data dir, HTTP port, log file), optionally inside a
    /// network namespace.
    pub fn start(
        dir: &Path,
        name: &str,
        http_host: &str,
        args: &[String],
        netns: Option<&str>,
    ) -> TestNode {
        let port = free_port();
        let data = dir.join(format!("{name}-data"));
        let log = dir.join(format!("{name}.log"));
        let logf = std::fs::File::create(&log).unwrap();
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, bin()]);
                c
            }
            None => Command::new(bin()),
        };
        cmd.args([
            "run",
            "--host",
            http_host,
            "--port",
            &port.to_string(),
            "--node-name",
            name,
            "--data-dir",
        ])
        .arg(&data)
        .args(args)
        .env("RUST_LOG", "llmesh_cluster=info,llmesh=info")
        .stdout(Stdio::null())
        .stderr(logf);
        let child = cmd.spawn().unwrap();
        TestNode {
            child: Some(child),
            http: format!("{http_host}:{port}"),
            log,
            name: name.to_string(),
        }
    }

    pub fn get(&self, path: &str) -> Option<Value> {
        http(&self.http, "GET", path, None)
            .ok()
            .filter(|r| r.status == 200)
            .map(|r| r.json())
    }

    pub fn post(&self, path: &str, body: &Value) -> Response {
        http(&self.http, "POST", path, Some(body)).unwrap()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Peak resident memory of the process (Linux).
    pub fn peak_rss(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(0, |k| k * 1024)
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `f` until it returns `Some` or the time is up.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > end {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Polls `f` like [`wait_for`]; on timeout the panic shows each node's topology and log tail.
pub fn wait_for_nodes<T>(
    what: &str,
    timeout: Duration,
    nodes: &[TestNode],
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > end {
            panic!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                describe(nodes)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Each node's topology and the last lines of its log, for failure messages.
pub fn describe(nodes: &[TestNode]) -> String {
    let mut out = String::new();
    for n in nodes {
        let topo = n.get("/v1/topology").map_or("(no answer)".into(), |t| {
            serde_json::json!({"nodes": t["nodes"], "plan": t["plan"]}).to_string()
        });
        let log = n.log_text();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(30)..].join("\n");
        out.push_str(&format!(
            "--- {} topology: {topo}\n--- {} log (last 30 lines):\n{tail}\n",
            n.name, n.name
        ));
    }
    out
}

/// The plan every node reports once all report the same one with every hop loaded.
pub fn agreed_plan(nodes: &[TestNode]) -> Option<Vec<(String, usize, usize)>> {
    let first = ready_plan(nodes.first()?)?;
    nodes[1..]
        .iter()
        .all(|n| ready_plan(n).as_ref() == Some(&first))
        .then_some(first)
}

/// The plan a node reports, as (name, start, end), once every hop has loaded its layers.
pub fn ready_plan(node: &TestNode) -> Option<Vec<(String, usize, usize)>> {
    let topo = node.get("/v1/topology")?;
    let plan: Vec<(String, String, usize, usize)> = topo["plan"]
        .as_array()?
        .iter()
        .map(|h| {
            (
                h["node"].as_str().unwrap_or_default().to_string(),
                h["name"].as_str().unwrap_or_default().to_string(),
                h["start"].as_u64().unwrap_or(0) as usize,
                h["end"].as_u64().unwrap_or(0) as usize,
            )
        })
        .collect();
    if plan.is_empty() {
        return None;
    }
    let nodes = topo["nodes"].as_array()?;
    for (id, _, s, e) in &plan {
        let n = nodes.iter().find(|n| n["id"] == id.as_str())?;
        let sh = n["shards"].as_array()?.first()?;
        if sh["start"].as_u64()? as usize != *s || sh["end"].as_u64()? as usize != *e {
            return None;
        }
    }
    Some(
        plan.into_iter()
            .map(|(_, name, s, e)| (name, s, e))
            .collect(),
    )
}
