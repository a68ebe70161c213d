#!/usr/bin/env python3
"""Render the generated models' chat templates with transformers and save the results as the
golden file `crates/llmesh-engine/tests/data/chat_templates.json`, which `cargo test` compares
llmesh's minijinja rendering against (not run in CI; rerun when a template or case changes).

Needs: pip install transformers jinja2
"""

import json
import os
import subprocess
import sys
import tempfile

from transformers import AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "crates/llmesh-engine/tests/data/chat_templates.json")

TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
                       "required": ["city"]},
    },
}]

CASES = [
    ("single user turn", [{"role": "user", "content": "Hello!"}], True, None, {}),
    ("system and multi-turn", [
        {"role": "system", "content": "  You are terse.  "},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": " 4 "},
        {"role": "user", "content": "And 3+3?\n"},
    ], True, None, {}),
    ("no generation prompt", [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello, how can I help?"},
    ], False, None, {}),
    ("unicode and markup", [{"role": "user", "content": "Ünïcödé ✓ <b>bold</b> {\"json\": 1}\n\tindent"}], True, None, {}),
    ("tools", [{"role": "user", "content": "Weather in Paris?"}], True, TOOLS, {}),
    ("tool results", [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "<tool_call>{\"name\": \"get_weather\"}</tool_call>"},
        {"role": "tool", "content": "{\"temp\": 21}"},
        {"role": "tool", "content": "{\"wind\": 3}"},
    ], True, None, {}),
    ("reasoning is dropped from history", [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "<think>\nlet me think\n</think>\n\nA1"},
        {"role": "user", "content": "Q2"},
    ], True, None, {}),
    ("thinking disabled", [{"role": "user", "content": "Quick answer"}], True, None, {"enable_thinking": False}),
    ("roles must alternate", [
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b"},
    ], True, None, {}),
]

MODELS = {"llama3": ("llama", "llama3"), "chatml": ("qwen2", "qwen"), "qwen3": ("qwen3", "qwen3"),
          "mistral": ("mistral", "mistral"), "llama2": ("llama", "llama2")}


def main():
    binary = os.path.join(ROOT, "target/release/llmesh")
    subprocess.run(["cargo", "build", "--release", "-q"], check=True, cwd=ROOT)
    work = tempfile.mkdtemp()
    results = []
    for name, (arch, tok) in MODELS.items():
        out = os.path.join(work, name)
        subprocess.run([binary, "dev", "make-model", "--arch", arch, "--tokenizer", tok, "--layers", "1", "--out", out],
                       check=True, capture_output=True)
        tokenizer = AutoTokenizer.from_pretrained(out)
        for case, messages, gen, tools, extra in CASES:
            kwargs = dict(extra)
            kwargs["date_string"] = "26 Jul 2024"
            try:
                text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                     add_generation_prompt=gen, **kwargs)
                expected = {"text": text}
            except Exception as e:  # a template's raise_exception
                expected = {"error": str(e)}
            results.append({"template": name, "case": case, "messages": messages, "tools": tools,
                            "add_generation_prompt": gen, "extra": kwargs, "expected": expected})
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(results, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {len(results)} cases to {OUT}")


if __name__ == "__main__":
    sys.exit(main())
