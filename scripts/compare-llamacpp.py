#!/usr/bin/env python3
"""Compare llmesh with llama.cpp on GGUF files of generated models (not run in CI).

For each architecture and each file type (F32, F16, Q8_0, Q4_0, Q4_K_M) this script
  * makes a tiny random model with `llmesh dev make-model`,
  * runs `llmesh generate --json --temperature 0` for a few prompts (24 tokens),
  * feeds llmesh's prompt and tokens to llama.cpp (llama-cpp-python) one step at a time and checks
    that llama.cpp's greedy choice equals llmesh's token wherever llama.cpp's top-2 logit margin
    exceeds 0.05 (below that, the two engines' rounding may legitimately pick either),
  * checks that both tokenize the prompts, and a long mixed text, to the same ids.

Usage: scripts/compare-llamacpp.py [--archs llama,qwen3,...] [--keep DIR]
Needs: pip install llama-cpp-python numpy   (the first install builds llama.cpp; a few minutes)
Exit status 0 when every checked step agrees.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

TYPES = ["f32", "f16", "q8_0", "q4_0", "q4_k_m"]
PROMPTS = [
    "The quick brown fox",
    "def fibonacci(n):\n    a, b = 0, 1\n",
    "Numbers: 1, 2, 3, 42, 128, and café au lait.",
]
MIXED = ("Hello, world! fn main() { println!(\"héllo\"); }\n\tTabs  and   spaces. "
         "你好，世界。🙂 Ελληνικά, привет. don't won't 3.14159 ") * 40
MARGIN = 0.05
# llama.cpp keeps its KV cache in f16 by default; llmesh keeps f32. LLMESH_COMPARE_KV=f16 compares
# against llama.cpp's default instead.
KV_F32 = {} if os.environ.get("LLMESH_COMPARE_KV") == "f16" else {"type_k": 0, "type_v": 0}
STEPS = 24


def llmesh(binary, *args):
    out = subprocess.run([binary, *args], check=True, capture_output=True, text=True)
    return out.stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", default="llama,mistral,qwen2,qwen3")
    ap.add_argument("--keep", help="write the models here instead of a temporary directory")
    ap.add_argument("--binary", default="target/release/llmesh")
    args = ap.parse_args()
    try:
        import llama_cpp
        import numpy as np
    except ImportError:
        sys.exit("needs: pip install llama-cpp-python numpy")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.chdir(root)
    if args.binary == "target/release/llmesh":
        subprocess.run(["cargo", "build", "--release", "-q"], check=True)
    work = args.keep or tempfile.mkdtemp(prefix="llmesh-compare-")
    failures = 0
    rows = []
    for arch in args.archs.split(","):
        out = os.path.join(work, arch)
        llmesh(args.binary, "dev", "make-model", "--arch", arch, "--out", out, "--gguf", ",".join(TYPES))
        for t in TYPES:
            path = os.path.join(out, f"model-{t}.gguf")
            llm = llama_cpp.Llama(model_path=path, n_ctx=512, logits_all=True, verbose=False,
                                  n_threads=2, n_batch=512, **KV_F32)
            # Tokenizer agreement on a long mixed text.
            ours = json.loads(llmesh(args.binary, "dev", "tokenize", "--model", path, "--text", MIXED))
            theirs = llm.tokenize(MIXED.encode(), add_bos=False, special=True)
            tok_ok = ours == theirs
            compared = agreed = skipped = 0
            prompt_ok = True
            first_bad = ""
            for prompt in PROMPTS:
                res = json.loads(llmesh(args.binary, "generate", "--model", path, "--prompt", prompt,
                                        "--max-tokens", str(STEPS), "--temperature", "0",
                                        "--threads", "2", "--json"))
                ids = res["prompt_token_ids"]
                their_prompt = llm.tokenize(prompt.encode(), add_bos=llm.metadata.get(
                    "tokenizer.ggml.add_bos_token", "true") == "true", special=True)
                if their_prompt != ids:
                    prompt_ok = False
                llm.reset()
                llm.eval(ids)
                for tok in res["token_ids"]:
                    logits = np.array(llm.scores[llm.n_tokens - 1])
                    top2 = np.argsort(logits)[-2:][::-1]
                    margin = float(logits[top2[0]] - logits[top2[1]])
                    if margin > MARGIN:
                        compared += 1
                        if int(top2[0]) == tok:
                            agreed += 1
                        elif not first_bad:
                            first_bad = f"{prompt[:12]!r} step {llm.n_tokens - len(ids)}: llmesh {tok}, llama.cpp {int(top2[0])} (margin {margin:.3f})"
                    else:
                        skipped += 1
                    llm.eval([tok])
            del llm
            ok = compared == agreed and prompt_ok and tok_ok
            failures += 0 if ok else 1
            rows.append((arch, t, compared, agreed, skipped, prompt_ok, tok_ok, first_bad))
    print(f"{'arch':8} {'type':7} {'checked':>7} {'agree':>6} {'margin<0.05':>11} {'prompt ids':>10} {'long text ids':>13}")
    for arch, t, c, a, s, p, tk, bad in rows:
        print(f"{arch:8} {t:7} {c:7d} {a:6d} {s:11d} {'same' if p else 'DIFFER':>10} {'same' if tk else 'DIFFER':>13}"
              + (f"  first disagreement: {bad}" if bad else ""))
    print(f"\n{len(PROMPTS)} prompts x {STEPS} greedy tokens per file; models in {work}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
