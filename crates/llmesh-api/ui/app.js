// llmesh chat page: conversations in localStorage, streaming replies over the OpenAI API,
// Markdown (marked + DOMPurify) with code highlighting (highlight.js), and a cluster panel.
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = "llmesh.conversations.v1";
const SETTINGS = "llmesh.settings.v1";

let conversations = load(STORE, []);
let currentId = conversations.length ? conversations[0].id : null;
let controller = null;

function load(key, fallback) {
  try { return JSON.parse(localStorage.getItem(key)) ?? fallback; } catch { return fallback; }
}
function save() { localStorage.setItem(STORE, JSON.stringify(conversations)); }

function current() { return conversations.find((c) => c.id === currentId) || null; }

function newConversation() {
  const c = { id: String(Date.now()) + Math.random().toString(16).slice(2, 6), title: "New chat", messages: [] };
  conversations.unshift(c);
  currentId = c.id;
  save();
  render();
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function showError(text) {
  const e = $("error");
  e.textContent = text;
  e.hidden = !text;
}

function markdown(text) {
  const html = DOMPurify.sanitize(marked.parse(text, { gfm: true, breaks: false }));
  const div = document.createElement("div");
  div.innerHTML = html;
  div.querySelectorAll("pre code").forEach((el) => hljs.highlightElement(el));
  return div;
}

function messageNode(m) {
  const div = document.createElement("div");
  div.className = "msg " + m.role;
  if (m.role === "assistant") {
    div.appendChild(markdown(m.content || ""));
    if (m.stats) {
      const s = document.createElement("div");
      s.className = "stats";
      s.textContent = m.stats;
      div.appendChild(s);
    }
  } else {
    div.textContent = m.content;
  }
  return div;
}

function render() {
  const list = $("conversations");
  list.innerHTML = "";
  for (const c of conversations) {
    const li = document.createElement("li");
    li.className = c.id === currentId ? "active" : "";
    const span = document.createElement("span");
    span.textContent = c.title;
    li.appendChild(span);
    const del = document.createElement("button");
    del.textContent = "×";
    del.title = "Delete";
    del.onclick = (ev) => {
      ev.stopPropagation();
      conversations = conversations.filter((x) => x.id !== c.id);
      if (currentId === c.id) currentId = conversations.length ? conversations[0].id : null;
      save();
      render();
    };
    li.appendChild(del);
    li.onclick = () => { currentId = c.id; render(); };
    list.appendChild(li);
  }
  const box = $("messages");
  box.innerHTML = "";
  const c = current();
  if (c) for (const m of c.messages) box.appendChild(messageNode(m));
  box.scrollTop = box.scrollHeight;
}

function settings() {
  const num = (id) => { const v = $(id).value; return v === "" ? undefined : Number(v); };
  return {
    temperature: num("temperature"), top_p: num("top_p"), top_k: num("top_k"),
    max_tokens: num("max_tokens"), seed: num("seed"),
  };
}

function saveSettings() {
  const s = settings();
  s.system = $("system").value;
  s.model = $("model").value;
  localStorage.setItem(SETTINGS, JSON.stringify(s));
}

function restoreSettings() {
  const s = load(SETTINGS, {});
  for (const k of ["temperature", "top_p", "top_k", "max_tokens", "seed"]) if (s[k] !== undefined) $(k).value = s[k];
  if (s.system) $("system").value = s.system;
  return s.model;
}

async function send(text) {
  if (!current()) newConversation();
  const c = current();
  c.messages.push({ role: "user", content: text });
  if (c.title === "New chat") c.title = text.slice(0, 40);
  const reply = { role: "assistant", content: "" };
  c.messages.push(reply);
  save();
  render();
  showError("");
  const node = $("messages").lastChild;
  const history = [];
  const system = $("system").value.trim();
  if (system) history.push({ role: "system", content: system });
  for (const m of c.messages.slice(0, -1)) history.push({ role: m.role, content: m.content });
  const body = { model: $("model").value, messages: history, stream: true, stream_options: { include_usage: true }, ...settings() };
  controller = new AbortController();
  $("stop").hidden = false;
  $("send").disabled = true;
  const t0 = performance.now();
  let tFirst = null, tokens = 0;
  try {
    const res = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal });
    if (!res.ok) {
      let msg = res.status + " " + res.statusText;
      try { msg = (await res.json()).error.message; } catch {}
      throw new Error(msg);
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let at;
      while ((at = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, at);
        buf = buf.slice(at + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          if (chunk.usage) tokens = chunk.usage.completion_tokens;
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          if (delta && delta.content) {
            if (tFirst === null) tFirst = performance.now();
            reply.content += delta.content;
            node.replaceChildren(markdown(reply.content));
            $("messages").scrollTop = $("messages").scrollHeight;
          }
        }
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") showError("Error: " + e.message);
  } finally {
    const t1 = performance.now();
    if (tFirst !== null) {
      const ttft = (tFirst - t0) / 1000;
      const rate = tokens > 1 && t1 > tFirst ? (tokens - 1) / ((t1 - tFirst) / 1000) : 0;
      reply.stats = `time to first token ${ttft.toFixed(2)} s · ${rate.toFixed(1)} tokens/s · ${tokens} tokens`;
    }
    if (!reply.content && !reply.stats) c.messages.pop();
    controller = null;
    $("stop").hidden = true;
    $("send").disabled = false;
    save();
    render();
  }
}

async function loadModels(preferred) {
  try {
    const res = await fetch("/v1/models", { headers: headers() });
    if (res.status === 401) {
      showError("This server needs an API key: open Settings and enter it.");
      $("settings").hidden = false;
      return;
    }
    const data = (await res.json()).data;
    const sel = $("model");
    sel.innerHTML = "";
    for (const m of data) {
      const o = document.createElement("option");
      o.value = m.id;
      o.textContent = m.id;
      sel.appendChild(o);
    }
    if (preferred && data.some((m) => m.id === preferred)) sel.value = preferred;
    $("demo-banner").hidden = !data.some((m) => m.id === sel.value && m.meta && m.meta.demo);
  } catch (e) {
    showError("Cannot reach the server: " + e.message);
  }
}

function gib(bytes) {
  if (bytes >= 2 ** 30) return (bytes / 2 ** 30).toFixed(1) + " GiB";
  return (bytes / 2 ** 20).toFixed(1) + " MiB";
}

async function loadTopology() {
  try {
    const res = await fetch("/v1/topology", { headers: headers() });
    if (!res.ok) return;
    const topo = await res.json();
    const box = $("cluster-nodes");
    box.innerHTML = "";
    for (const n of topo.nodes) {
      const div = document.createElement("div");
      div.className = "node";
      const name = document.createElement("div");
      name.className = "name";
      name.textContent = n.name;
      if (n.is_self) { const s = document.createElement("span"); s.className = "self"; s.textContent = " (this node)"; name.appendChild(s); }
      div.appendChild(name);
      const mem = document.createElement("div");
      mem.className = "muted";
      mem.textContent = `${n.backend} · weights ${gib(n.weight_bytes)} · memory ${gib(n.memory_budget_bytes)}`;
      div.appendChild(mem);
      for (const s of n.shards) {
        const l = document.createElement("div");
        l.className = "shard";
        l.textContent = `${s.model}: layers ${s.start}–${s.end - 1} of ${s.total_layers}`;
        div.appendChild(l);
        const bar = document.createElement("div");
        bar.className = "layers";
        const fill = document.createElement("span");
        fill.style.left = (100 * s.start / s.total_layers) + "%";
        fill.style.width = (100 * (s.end - s.start) / s.total_layers) + "%";
        bar.appendChild(fill);
        div.appendChild(bar);
      }
      box.appendChild(div);
    }
    if (topo.plan && topo.plan.length) {
      const plan = document.createElement("div");
      plan.className = "plan muted";
      plan.textContent = "Pipeline: " + topo.plan.map((h) => `${h.name} [${h.start}–${h.end - 1}]`).join(" → ");
      box.appendChild(plan);
    }
    const links = (topo.links || []).length;
    if (links) {
      const l = document.createElement("div");
      l.className = "muted";
      l.textContent = `${links} link${links === 1 ? "" : "s"} from this node`;
      box.appendChild(l);
    }
  } catch { /* the panel keeps its last state */ }
}

function init() {
  const preferred = restoreSettings();
  $("api-key").value = sessionStorage.getItem("llmesh.key") || "";
  $("new-chat").onclick = newConversation;
  $("settings-toggle").onclick = () => {
    const s = $("settings");
    s.hidden = !s.hidden;
    $("settings-toggle").setAttribute("aria-expanded", String(!s.hidden));
  };
  $("api-key").onchange = () => { sessionStorage.setItem("llmesh.key", $("api-key").value); loadModels($("model").value); loadTopology(); };
  for (const id of ["temperature", "top_p", "top_k", "max_tokens", "seed", "system", "model"]) $(id).addEventListener("change", saveSettings);
  $("model").addEventListener("change", () => loadModels($("model").value));
  $("stop").onclick = () => controller && controller.abort();
  $("composer").onsubmit = (ev) => {
    ev.preventDefault();
    const text = $("input").value.trim();
    if (!text || controller) return;
    $("input").value = "";
    send(text);
  };
  $("input").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); }
  });
  render();
  loadModels(preferred);
  loadTopology();
  setInterval(loadTopology, 5000);
}

init();
