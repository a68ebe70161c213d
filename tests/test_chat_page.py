#!/usr/bin/env python3
"""The chat page in a real headless Chromium, driven over the W3C WebDriver protocol (chromedriver,
plain HTTP, no Python packages): it opens `/`, sends a message, sees the streamed reply and its
speed line, sees the cluster panel, and saves a screenshot. Run by `scripts/test`.

Needs: apt-get install chromium chromium-driver
Screenshot: $LLMESH_SCREENSHOT or target/chat-page.png
"""

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from server import ROOT, Server, make_model  # noqa: E402


class WebDriver:
    def __init__(self):
        driver = shutil.which("chromedriver")
        browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
        if not driver or not browser:
            raise SystemExit("needs chromium and chromedriver: apt-get install -y chromium chromium-driver")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.proc = subprocess.Popen([driver, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                self._call("GET", "/status")
                break
            except Exception:
                time.sleep(0.1)
        self.profile = tempfile.mkdtemp(prefix="llmesh-chromium-")
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": browser,
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                     "--window-size=1280,860", f"--user-data-dir={self.profile}"]}}}}
        self.session = self._call("POST", "/session", caps)["sessionId"]

    def _call(self, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.load(r)["value"]

    def cmd(self, method, path, body=None):
        return self._call(method, f"/session/{self.session}{path}", body)

    def find(self, css):
        el = self.cmd("POST", "/element", {"using": "css selector", "value": css})
        return next(iter(el.values()))

    def run_js(self, script, *args):
        return self.cmd("POST", "/execute/sync", {"script": script, "args": list(args)})

    def wait_for(self, what, fn, timeout=30):
        end = time.time() + timeout
        while time.time() < end:
            v = fn()
            if v:
                return v
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}")

    def close(self):
        try:
            self.cmd("DELETE", "")
        finally:
            self.proc.terminate()
            shutil.rmtree(self.profile, ignore_errors=True)


def main():
    with Server(model=None) as server:  # the built-in demo model, as a newcomer sees it
        wd = WebDriver()
        try:
            wd.cmd("POST", "/url", {"url": server.url + "/"})
            wd.wait_for("the model picker", lambda: wd.run_js("return document.querySelector('#model').value") == "demo")
            banner = wd.run_js("return !document.querySelector('#demo-banner').hidden")
            assert banner, "the demo banner is not shown for the demo model"
            panel = wd.wait_for("the cluster panel", lambda: wd.run_js(
                "const n = document.querySelector('#cluster-nodes .node'); return n && n.innerText"))
            assert "this node" in panel and "layers 0–3 of 4" in panel, panel
            pipeline = wd.wait_for("the pipeline line", lambda: wd.run_js(
                "const p = document.querySelector('#cluster-nodes .plan'); return p && p.innerText"))
            assert "Pipeline:" in pipeline and "[0–3]" in pipeline, pipeline
            box = wd.find("#input")
            wd.cmd("POST", f"/element/{box}/value", {"text": "Hello! Can you show me some **markdown**?"})
            wd.cmd("POST", f"/element/{wd.find('#send')}/click", {})
            reply = wd.wait_for("a streamed reply", lambda: wd.run_js(
                "const m = document.querySelectorAll('.msg.assistant'); const s = m.length && m[m.length-1].querySelector('.stats');"
                "return s ? m[m.length-1].innerText : null"), timeout=60)
            stats = wd.run_js("const m = document.querySelectorAll('.msg.assistant'); return m[m.length-1].querySelector('.stats').innerText")
            assert "time to first token" in stats and "tokens/s" in stats, stats
            user = wd.run_js("return document.querySelector('.msg.user').innerText")
            assert user.startswith("Hello!"), user
            saved = wd.run_js("return JSON.parse(localStorage.getItem('llmesh.conversations.v1'))[0].messages.length")
            assert saved == 2, f"conversation not kept in the browser: {saved}"
            error = wd.run_js("return document.querySelector('#error').hidden")
            assert error, "an error is shown: " + wd.run_js("return document.querySelector('#error').innerText")
            # Markdown renders through marked, code is highlighted, and HTML in replies is sanitised.
            html = wd.run_js("return markdown('# Title\\n\\n**bold** and `code`\\n\\n```python\\ndef f():\\n    return 1\\n```\\n\\n<img src=x onerror=alert(1)>').innerHTML")
            assert "<h1>Title</h1>" in html and "<strong>bold</strong>" in html, html
            assert "hljs" in html and "language-python" in html, html
            assert "onerror" not in html, html
            print("ok   markdown, code highlighting and sanitising")
            shot = os.environ.get("LLMESH_SCREENSHOT") or os.path.join(ROOT, "target", "chat-page.png")
            os.makedirs(os.path.dirname(shot), exist_ok=True)
            with open(shot, "wb") as f:
                f.write(base64.b64decode(wd.cmd("GET", "/screenshot")))
            print(f"ok   chat page: reply of {len(reply)} characters streamed; {stats}")
            print(f"ok   cluster panel: {panel!r}")
            print(f"ok   screenshot saved to {shot}")
        finally:
            wd.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
