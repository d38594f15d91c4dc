"""The OpenAI-compatible server (`python generate.py serve=true`), run as a real process on a
micro checkpoint and exercised with the `openai` client package.

Greedy replies are compared with `model.generation.generate` on the same checkpoint loaded in
the test: the tokens must be equal and the reported log-probs (the model's own softmax) agree to
1e-4 (fp32 on CPU, the same computation in batches of other compositions: ~1e-6 on values of
order 1-10, with margin). Concurrent clients must each get what they get alone; every bad
request is a 4xx with a message, and the server keeps serving after it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from model.generation import generate  # noqa: E402
from tests.train._rollout_support import micro_checkpoint, train_tokenizer  # noqa: E402
from train.loading import load_model_and_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
NAME = "micro"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    ckpt = micro_checkpoint(root, train_tokenizer(root / "tokenizer.json"), max_seq_len=1024)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "generate.py", f"ckpt={ckpt}", "serve=true",
                             f"port={port}", "max_batch=8", f"served_model_name={NAME}",
                             "dtype=float32"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
        assert proc.poll() is None, proc.stdout.read()
    else:
        proc.kill()
        pytest.fail("the server did not come up in 120 s")
    model, tokenizer = load_model_and_tokenizer(str(ckpt), None, "cpu", "float32", None)
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)
    yield client, base, model, tokenizer
    proc.terminate()
    proc.wait(timeout=30)


def test_greedy_completion_equals_generate_with_its_logprobs(served):
    client, _, model, tokenizer = served
    prompt = [0] + tokenizer.encode("the cat sat on", add_special_tokens=False)
    ref = generate(model, [prompt], max_new_tokens=12, temperature=0.0,
                   eos_id=tokenizer.eos_token_id, return_logprobs=True)
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0,
                                  logprobs=3, n=2)
    want = tokenizer.decode(ref.tokens[0], skip_special_tokens=False)
    for choice in r.choices:  # n greedy samples of one prefill: the same reply twice
        assert choice.text == want.replace(tokenizer.eos_token, "")
        got = torch.tensor(choice.logprobs.token_logprobs)
        torch.testing.assert_close(got, ref.raw_logprobs[0], rtol=0, atol=1e-4)
        top = choice.logprobs.top_logprobs[0]
        assert len(top) == 3 and max(top.values()) >= got[0] - 1e-4  # greedy: the top token
    assert r.usage.completion_tokens == 2 * len(ref.tokens[0])
    assert r.usage.prompt_tokens == len(prompt)


def test_chat_sampling_is_reproducible_with_a_seed_and_streams_add_up(served):
    client, *_ = served
    messages = [{"role": "user", "content": "what is one and two"}]
    kw = dict(model=NAME, messages=messages, max_tokens=10, temperature=1.0, n=3, seed=7)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1  # samples differ from each other
    for effort in (None, "high", "max"):
        extra = {} if effort is None else {"reasoning_effort": effort}
        whole = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12,
                                               temperature=0, **extra).choices[0]
        content, reasoning, reasons = "", "", []
        for chunk in client.chat.completions.create(model=NAME, messages=messages,
                                                    max_tokens=12, temperature=0, stream=True,
                                                    **extra):
            delta = chunk.choices[0].delta
            content += delta.content or ""
            reasoning += getattr(delta, "reasoning_content", None) or ""
            reasons.append(chunk.choices[0].finish_reason)
        assert content == (whole.message.content or "")
        assert reasoning == (getattr(whole.message, "reasoning_content", None) or "")
        assert reasons[-1] == whole.finish_reason and reasons[:-1] == [None] * (len(reasons) - 1)


def test_tools_and_tool_results_are_rendered(served):
    client, *_ = served
    tools = [{"type": "function", "function": {
        "name": "calculator", "description": "Evaluates arithmetic.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                       "required": ["expression"]}}}]
    history = [{"role": "user", "content": "two plus three"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "calculator", "arguments": '{"expression": "2+3"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "5"}]
    plain = client.chat.completions.create(model=NAME, messages=history[:1], max_tokens=2)
    used = client.chat.completions.create(model=NAME, messages=history, tools=tools,
                                          max_tokens=2)
    assert used.usage.prompt_tokens > plain.usage.prompt_tokens + 20  # the tools block
    assert used.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_concurrent_clients_get_what_they_get_alone(served):
    client, *_ = served
    prompts = [f"the dog ran {'far ' * k}" for k in range(8)]

    def ask(p):
        return client.completions.create(model=NAME, prompt=p, max_tokens=6 + len(p) % 5,
                                         temperature=0).choices[0].text

    alone = [ask(p) for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone


def test_bad_requests_are_4xx_with_a_message_and_the_server_goes_on(served):
    client, base, *_ = served
    r = httpx.post(base + "/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    cases = [(dict(model="nope"), 404, "does not exist"),
             (dict(max_tokens=-1), 400, "max_tokens"),
             (dict(prompt="far " * 1200), 400, "context"),
             (dict(max_tokens=10_000), 400, "context"),
             (dict(n=9), 400, "n=9"),
             (dict(temperature=-1), 400, "temperature"),
             (dict(prompt=[5, 99999]), 400, "token ids")]
    for change, status, words in cases:
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(**{"model": NAME, "prompt": "hi", "max_tokens": 4,
                                         **change})
        assert e.value.status_code == status and words in e.value.message, (change, e.value)
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model=NAME, max_tokens=2,
                                       messages=[{"role": "wizard", "content": "x"}])
    body = httpx.get(base + "/v1/models").json()
    assert body["data"][0]["id"] == NAME
    ok = client.completions.create(model=NAME, prompt="hi", max_tokens=3)
    assert ok.choices[0].finish_reason in ("stop", "length")
    assert json.loads(ok.model_dump_json())["usage"]["completion_tokens"] >= 1


def test_speculative_server_gives_the_same_greedy_reply_with_drafts(served):
    """`speculative=true`: the server's engine drafts with the MTP block
    (`model/speculative_engine.py`); the greedy reply (two samples of one prefill, streamed
    and not) is `generate`'s. Served in process through FastAPI's test client."""
    from fastapi.testclient import TestClient

    from serve.app import Server, build_app

    _, _, model, tokenizer = served
    server = Server(model, tokenizer, NAME, max_batch=4, speculative=True)
    prompt = [0] + tokenizer.encode("the dog ran far", add_special_tokens=False)
    ref = generate(model, [prompt], max_new_tokens=10, temperature=0.0,
                   eos_id=tokenizer.eos_token_id)
    want = tokenizer.decode(ref.tokens[0], skip_special_tokens=False) \
        .replace(tokenizer.eos_token, "")
    with TestClient(build_app(server)) as http:
        body = dict(model=NAME, prompt=prompt, max_tokens=10, temperature=0, n=2)
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        assert [c["text"] for c in r.json()["choices"]] == [want, want]
        streamed = http.post("/v1/completions", json={**body, "n": 1, "stream": True})
        chunks = [json.loads(line[6:]) for line in streamed.text.splitlines()
                  if line.startswith("data: {")]
        assert "".join(c["choices"][0]["text"] for c in chunks) == want
    assert server.worker.engine.stats["drafted"] > 0
