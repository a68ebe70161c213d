#!/usr/bin/env python3
"""The OpenAI-compatible API, driven by the official `openai` Python package against a real
`llmesh run` serving a generated model. Run by `scripts/test` (and so by CI).

Needs: pip install openai
"""

import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request

import openai

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from server import Server, binary, make_model  # noqa: E402

KEY = "test-key-123"
failures = []


def check(name, cond, detail=""):
    print(("ok   " if cond else "FAIL ") + name + ("" if cond else f": {detail}"))
    if not cond:
        failures.append(name)


def expect_error(name, cls, fn, code=None):
    try:
        fn()
    except cls as e:
        got = getattr(e, "code", None)
        check(name, code is None or got == code, f"code {got!r}, wanted {code!r}: {e}")
        return
    except Exception as e:  # the wrong class
        check(name, False, f"raised {type(e).__name__}: {e}")
        return
    check(name, False, "no exception")


def main():
    with tempfile.TemporaryDirectory(prefix="llmesh-openai-") as work:
        return check_all(work)


def check_all(work):
    model_dir = make_model(os.path.join(work, "tiny-llama"))
    with Server(model=model_dir, api_key=KEY) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        model = "tiny-llama"

        models = client.models.list()
        check("models.list names the model", [m.id for m in models.data] == [model], models)
        check("models.retrieve", client.models.retrieve(model).id == model)

        msgs = [{"role": "user", "content": "Write a haiku about meshes."}]
        full = client.chat.completions.create(model=model, messages=msgs, temperature=0, seed=7, max_tokens=40)
        text = full.choices[0].message.content
        check("chat non-stream returns text", isinstance(text, str) and len(text) > 0, full)
        check("chat object and usage", full.object == "chat.completion" and full.usage.total_tokens
              == full.usage.prompt_tokens + full.usage.completion_tokens and full.id.startswith("chatcmpl-"), full)
        chunks = list(client.chat.completions.create(model=model, messages=msgs, temperature=0, seed=7, max_tokens=40,
                                                     stream=True, stream_options={"include_usage": True}))
        joined = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        check("chat stream chunks join to the non-stream text", joined == text, f"{joined!r} vs {text!r}")
        check("stream ends with usage", chunks[-1].usage is not None and chunks[-1].usage.completion_tokens
              == full.usage.completion_tokens, chunks[-1])
        finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        check("stream finish_reason", finals == [full.choices[0].finish_reason], finals)

        # Completions with a string and with the same prompt as token ids.
        c1 = client.completions.create(model=model, prompt="The mesh of devices", max_tokens=12, temperature=0)
        ids = json.loads(subprocess.run([binary(), "dev", "tokenize", "--model", model_dir, "--text",
                                         "The mesh of devices", "--add-special"],
                                        capture_output=True, text=True, check=True).stdout)
        c2 = client.completions.create(model=model, prompt=ids, max_tokens=12, temperature=0)
        check("completion with a string", c1.object == "text_completion" and len(c1.choices[0].text) > 0, c1)
        check("completion with token ids equals the string prompt", c1.choices[0].text == c2.choices[0].text,
              f"{c1.choices[0].text!r} vs {c2.choices[0].text!r}")
        check("completion usage counts the prompt ids", c2.usage.prompt_tokens == len(ids), c2.usage)

        # Log-probabilities.
        lp = client.chat.completions.create(model=model, messages=msgs, temperature=0, max_tokens=8, logprobs=True,
                                            top_logprobs=3)
        content = lp.choices[0].logprobs.content
        ok = len(content) > 0 and all(len(t.top_logprobs) == 3 for t in content)
        ok = ok and all(t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
                        for t in content)
        ok = ok and all(abs(t.logprob - t.top_logprobs[0].logprob) < 1e-5 for t in content)  # greedy picks the top
        check("chat logprobs with top_logprobs", ok, content[:2])
        # Token bytes (not texts: a token may end inside a character) spell the reply; special
        # tokens are left out of the text.
        spelled = b"".join(bytes(t.bytes) for t in content).decode("utf-8", "replace")
        spelled = re.sub(r"<\|[a-z_0-9]+\|>", "", spelled)
        check("logprob token bytes spell the text", spelled == lp.choices[0].message.content,
              f"{spelled!r} vs {lp.choices[0].message.content!r}")
        clp = client.completions.create(model=model, prompt="Hello", max_tokens=5, temperature=0, logprobs=2, echo=True)
        l = clp.choices[0].logprobs
        check("completion logprobs with echo", len(l.tokens) == len(l.token_logprobs) == len(l.top_logprobs)
              == len(l.text_offset) and clp.choices[0].text.startswith("Hello"), l)

        # Stop strings: cut the greedy text at a piece of itself.
        base = client.completions.create(model=model, prompt="Once upon a time", max_tokens=30, temperature=0)
        t = base.choices[0].text
        stop = t[10:13] if len(t) > 13 else None
        if stop:
            s = client.completions.create(model=model, prompt="Once upon a time", max_tokens=30, temperature=0,
                                          stop=[stop, "never-appears"])
            check("stop string cuts the text", s.choices[0].text == t[:t.index(stop)]
                  and s.choices[0].finish_reason == "stop", f"{s.choices[0].text!r} / {t!r} / {stop!r}")
        else:
            check("greedy text long enough to test stop strings", False, t)

        m = client.chat.completions.create(model=model, messages=msgs, max_tokens=3, temperature=0.8, seed=1)
        check("max_tokens gives finish_reason length", m.choices[0].finish_reason == "length"
              and m.usage.completion_tokens == 3, m)

        # Errors raise the client's exception classes.
        expect_error("unknown model -> NotFoundError", openai.NotFoundError,
                     lambda: client.chat.completions.create(model="no-such-model", messages=msgs), "model_not_found")
        expect_error("bad field -> BadRequestError", openai.BadRequestError,
                     lambda: client.chat.completions.create(model=model, messages=msgs, temperature="hot"))
        expect_error("out-of-range field -> BadRequestError", openai.BadRequestError,
                     lambda: client.chat.completions.create(model=model, messages=msgs, top_p=7))
        expect_error("n > 1 -> BadRequestError", openai.BadRequestError,
                     lambda: client.chat.completions.create(model=model, messages=msgs, n=2))
        expect_error("context exceeded -> BadRequestError", openai.BadRequestError,
                     lambda: client.chat.completions.create(model=model, messages=msgs, max_tokens=10 ** 6),
                     "context_length_exceeded")
        long_prompt = "word " * 5000
        expect_error("long prompt -> context_length_exceeded", openai.BadRequestError,
                     lambda: client.completions.create(model=model, prompt=long_prompt, max_tokens=5),
                     "context_length_exceeded")
        bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
        expect_error("wrong API key -> AuthenticationError", openai.AuthenticationError,
                     lambda: bad.models.list(), "invalid_api_key")

        # 16 concurrent streams with different seeds equal the same requests run alone.
        async def one(aclient, seed):
            stream = await aclient.chat.completions.create(model=model, messages=msgs, temperature=1.0, seed=seed,
                                                           max_tokens=24, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        async def concurrent():
            aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
            return await asyncio.gather(*(one(aclient, s) for s in range(16)))

        together = asyncio.run(concurrent())
        alone = [client.chat.completions.create(model=model, messages=msgs, temperature=1.0, seed=s, max_tokens=24)
                 .choices[0].message.content for s in range(16)]
        check("16 concurrent streams equal the requests alone", together == alone,
              [i for i in range(16) if together[i] != alone[i]])
        check("different seeds give different texts", len(set(alone)) > 8, alone)

        # A client that goes away mid-stream frees its worker.
        stream = client.chat.completions.create(model=model, messages=msgs, max_tokens=1900, stream=True)
        for i, _ in enumerate(stream):
            if i == 3:
                break
        stream.close()
        freed = False
        for _ in range(100):
            h = server.get_json("/healthcheck")
            if h["running"] == 0:
                freed = True
                break
            time.sleep(0.05)
        check("a disconnected stream stops generating", freed, h)
        with urllib.request.urlopen(server.url + "/metrics") as r:
            text = r.read().decode()
        check("metrics count requests and tokens", 'llmesh_requests_total{endpoint="chat_completions",code="200"}' in text
              and "llmesh_time_to_first_token_seconds_count" in text and "llmesh_generated_tokens_total" in text, text[:500])

    if failures:
        print(f"\n{len(failures)} check(s) failed: {failures}")
        return 1
    print("\nall OpenAI client checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
