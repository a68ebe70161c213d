"""Starting and stopping a real `llmesh run` for the Python tests."""

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def binary():
    path = os.environ.get("LLMESH_BIN") or os.path.join(ROOT, "target", "debug", "llmesh")
    if not os.path.exists(path):
        raise SystemExit(f"{path} does not exist: run `cargo build` first (or set LLMESH_BIN)")
    return path


def make_model(out, arch="llama", layers=2, extra=()):
    subprocess.run([binary(), "dev", "make-model", "--arch", arch, "--layers", str(layers), "--out", out, *extra],
                   check=True, capture_output=True)
    return out


class Server:
    """`llmesh run` on a free port; `url` is its base URL."""

    def __init__(self, model=None, api_key=None, extra=()):
        self.data = tempfile.mkdtemp(prefix="llmesh-test-")
        args = [binary(), "run", "--port", "0", "--data-dir", self.data, "--listen", "127.0.0.1:0", "--no-discovery", *extra]
        if model:
            args += ["--model", model]
        if api_key:
            args += ["--api-key", api_key]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        m = re.search(r"at (http://[^\s]+)", line)
        if not m:
            self.proc.kill()
            raise RuntimeError(f"llmesh run did not start: {line}{self.proc.stderr.read()}")
        self.url = m.group(1)
        for _ in range(100):
            try:
                urllib.request.urlopen(self.url + "/healthcheck", timeout=1)
                break
            except Exception:
                time.sleep(0.05)

    def get_json(self, path, key=None):
        req = urllib.request.Request(self.url + path)
        if key:
            req.add_header("Authorization", "Bearer " + key)
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.load(r)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.data, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
