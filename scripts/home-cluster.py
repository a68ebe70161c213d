#!/usr/bin/env python3
"""A simulated home cluster (not run in CI; needs root, cgroup v1, iproute2).

Three nodes in three network namespaces on a bridge, made unequal:
  node    CPU (cgroup v1 cpu.cfs_quota_us,   memory (memory.limit_in_bytes)   link (tc tbf)
          per 4 ms cpu.cfs_period_us)
  fast    100% of a core                      --mem each (default 110 MiB)     1 Gbit/s
  medium   50% of a core                      same                             200 Mbit/s
  slow     25% of a core                      same                             200 Mbit/s
For each partitioner (memory-weighted, latency) it starts the three nodes (they find each other by
mDNS and measure their own speed inside their cgroup), waits until the plan has held for a few
seconds, streams completions from the fast node and reports the median time per output token and
the plan (checked unchanged afterwards). The two partitioners take turns, --rounds times each,
and the ratio is taken between their medians. The latency partitioner
should be at most 0.8x the memory-weighted time.

Usage: sudo scripts/home-cluster.py [--model FILE] [--mem MiB] [--tokens N] [--runs N] [--rounds N]
Default model: the synthetic bench model (`llmesh bench` makes it), Q8_0, 16 layers, ~184 MiB.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# CPU quotas per period of CFS_PERIOD_US. The period is 4 ms, the shortest that still gives the
# 25% node the kernel's minimum quota of 1 ms, rather than the default 100 ms. A node's work per
# token is a few milliseconds: with a long period a node whose share stays under its quota runs
# it at full speed in a burst and then stops (a 25% node computes 25 ms of a 100 ms period flat
# out), so it is slow only when busy for longer than that, and whether a token's work meets a
# fresh quota or an exhausted one decides its time. The shorter the period, the more evenly a
# node is slowed, as a slower device is.
CFS_PERIOD_US = 4000
NODES = [("fast", 4000, "1gbit"), ("medium", 2000, "200mbit"), ("slow", 1000, "200mbit")]
SUBNET = "10.232.7"
BRIDGE = "llhomebr"


def sh(*args, check=True):
    r = subprocess.run(args, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise SystemExit(f"{' '.join(args)}: {r.stderr.strip()}")
    return r


def setup_lan():
    teardown_lan()
    sh("ip", "link", "add", BRIDGE, "type", "bridge")
    sh("ip", "addr", "add", f"{SUBNET}.254/24", "dev", BRIDGE)
    sh("ip", "link", "set", BRIDGE, "up")
    for i, (name, _, rate) in enumerate(NODES, 1):
        ns, veth = f"llhome{i}", f"llhv{i}"
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "link", "set", veth, "master", BRIDGE, "up")
        sh("ip", "-n", ns, "addr", "add", f"{SUBNET}.{i}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0")
        # Shape both directions of the node's link.
        sh("tc", "qdisc", "add", "dev", veth, "root", "tbf", "rate", rate, "burst", "64kb", "latency", "50ms")
        sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", rate, "burst", "64kb",
           "latency", "50ms")


def teardown_lan():
    for i in range(1, len(NODES) + 1):
        sh("ip", "netns", "del", f"llhome{i}", check=False)
    sh("ip", "link", "del", BRIDGE, check=False)


def cgroup(name, quota, mem_bytes):
    cpu, memory = f"/sys/fs/cgroup/cpu/llmesh-{name}", f"/sys/fs/cgroup/memory/llmesh-{name}"
    for d in (cpu, memory):
        os.makedirs(d, exist_ok=True)
    open(f"{cpu}/cpu.cfs_period_us", "w").write(str(CFS_PERIOD_US))
    open(f"{cpu}/cpu.cfs_quota_us", "w").write(str(quota))
    open(f"{memory}/memory.limit_in_bytes", "w").write(str(mem_bytes))
    return cpu, memory


def get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


def start_nodes(binary, model, strategy, mem_mib, work):
    procs = []
    for i, (name, quota, _) in enumerate(NODES, 1):
        # The node may use a little less than its cgroup, leaving room for the process itself.
        cpu, memory = cgroup(name, quota, (mem_mib + 96) << 20)
        log = open(os.path.join(work, f"{strategy}-{name}.log"), "a")
        cmd = (f"echo $$ > {cpu}/cgroup.procs && echo $$ > {memory}/cgroup.procs && "
               f"exec ip netns exec llhome{i} {binary} run --model {model} --host {SUBNET}.{i} --port 8000 "
               f"--listen 0.0.0.0:47480 --cluster-key home-cluster-simulation-key --memory-limit {mem_mib}MiB "
               f"--kv-cache-tokens 1024 --threads 1 --parallel 1 --node-name {name} --partitioner {strategy} "
               f"--data-dir {work}/{strategy}-{name}")
        procs.append(subprocess.Popen(["sh", "-c", cmd], stdout=log, stderr=subprocess.STDOUT,
                                      env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "llmesh_cluster=info")}))
    return procs


def current_plan(url):
    """The plan, once every node of it has loaded its layers and the node is healthy; else None."""
    topo = get(url + "/v1/topology")
    health = get(url + "/healthcheck")
    plan = topo["plan"]
    loaded = {n["name"]: (n["shards"][0]["start"], n["shards"][0]["end"]) if n["shards"] else None
              for n in topo["nodes"]}
    if plan and len(topo["nodes"]) == 3 and health["status"] == "ok" and all(
            loaded.get(h["name"]) == (h["start"], h["end"]) for h in plan):
        return plan
    return None


def wait_plan(url, timeout=300, settle=5.0):
    """Waits for a plan that has held, loaded, for `settle` seconds: a plan made before the last
    node joined (or before its speed was known) is replaced moments later."""
    end = time.time() + timeout
    held, since = None, time.time()
    while time.time() < end:
        try:
            plan = current_plan(url)
        except Exception:
            plan = None
        if plan != held:
            held, since = plan, time.time()
        elif plan and time.time() - since >= settle:
            return plan
        time.sleep(0.5)
    raise SystemExit("no plan in time")


def measure(url, model_id, tokens):
    body = json.dumps({"model": model_id, "prompt": "The quick brown fox", "max_tokens": tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    t0 = time.time()
    first = None
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            if first is None:
                first = time.time()
    end = time.time()
    return first - t0, (end - first) / (tokens - 1)


def run_strategy(binary, model, strategy, args, work):
    """Starts the three nodes with `strategy`, measures, stops them: (TPOT, TTFT, plan)."""
    procs = start_nodes(binary, model, strategy, args.mem, work)
    try:
        url = f"http://{SUBNET}.1:8000"
        plan = wait_plan(url)
        model_id = get(url + "/v1/models")["data"][0]["id"]
        measure(url, model_id, 4)  # warm up
        runs = [measure(url, model_id, args.tokens) for _ in range(args.runs)]
        if current_plan(url) != plan:
            raise SystemExit(f"{strategy}: the plan changed while it was measured")
        tpot = sorted(r[1] for r in runs)[len(runs) // 2]
        ttft = sorted(r[0] for r in runs)[len(runs) // 2]
        return tpot, ttft, plan
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
        time.sleep(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--mem", type=int, default=110, help="MiB each node may use for weights and cache")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--runs", type=int, default=5, help="completions measured per start of a cluster (median)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="times each partitioner's cluster is started, taking turns (median over rounds)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces and cgroups)")
    subprocess.run(["cargo", "build", "--release", "-q"], cwd=ROOT, check=True)
    binary = os.path.join(ROOT, "target", "release", "llmesh")
    work = tempfile.mkdtemp(prefix="llmesh-home-")
    model = args.model
    if not model:
        data = os.path.join(work, "data")
        subprocess.run([binary, "bench", "--data-dir", data, "--repeat", "1", "--prompt-tokens", "8", "--gen-tokens", "2"],
                       check=True, capture_output=True)
        model = os.path.join(data, "bench-model", "model-q8_0.gguf")
    results = {"memory-weighted": [], "latency": []}
    try:
        setup_lan()
        # The partitioners take turns (ABBA...), so a slow minute on a shared machine does not
        # land on one of them only.
        for rnd in range(args.rounds):
            order = ["memory-weighted", "latency"] if rnd % 2 == 0 else ["latency", "memory-weighted"]
            for strategy in order:
                tpot, ttft, plan = run_strategy(binary, model, strategy, args, work)
                results[strategy].append((tpot, plan))
                print(f"round {rnd + 1} {strategy:16} TPOT {tpot * 1e3:8.1f} ms   TTFT {ttft * 1e3:8.1f} ms   plan: "
                      + " → ".join(f"{h['name']}[{h['start']}..{h['end']}]" for h in plan), flush=True)
    finally:
        teardown_lan()
        for name, _, _ in NODES:
            for kind in ("cpu", "memory"):
                try:
                    os.rmdir(f"/sys/fs/cgroup/{kind}/llmesh-{name}")
                except OSError:
                    pass
    median = {k: sorted(t for t, _ in v)[len(v) // 2] for k, v in results.items()}
    for k, v in results.items():
        print(f"{k:16} median TPOT over {len(v)} rounds: {median[k] * 1e3:.1f} ms")
    ratio = median["latency"] / median["memory-weighted"]
    print(f"\nlatency ÷ memory-weighted time per output token: {ratio:.2f} (goal ≤ 0.80); logs in {work}")
    shutil.rmtree(os.path.join(work, "data"), ignore_errors=True)
    return 0 if ratio <= 0.8 else 1


if __name__ == "__main__":
    sys.exit(main())
