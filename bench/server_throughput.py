"""The OpenAI-compatible server under load: 16 clients at once against the same 16 requests sent
one at a time (both against one server process, so the difference is the continuous batch).

    python bench/server_throughput.py [--config tiny] [--clients 16] [--min-new 16]
                                      [--max-new 64] [--threads 2]

A random-weight model of `--config` with a small byte-level BPE tokenizer is saved to a
temporary folder and served by `python generate.py serve=true`; each request is a
`/v1/completions` call (stdlib HTTP client) with its own prompt, its own `max_tokens` between
--min-new and --max-new and its own seed (temperature 1: a random model rarely draws EOS, so
each reply runs to its `max_tokens`, and both runs generate the same token count). Prints
generated tokens/s of each and the ratio; one machine, one run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from data.tokenizer_train import train_tokenizer  # noqa: E402
from model.config import get_config  # noqa: E402
from model.transformer import Transformer  # noqa: E402
from model.weights import save_pretrained  # noqa: E402

WORDS = "the a cat dog sat on mat and then ran far away hello world one two three".split()


def checkpoint(folder: str, config: str) -> str:
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(500)]
    tok = train_tokenizer(texts, 400, os.path.join(folder, "tok"))
    torch.manual_seed(0)
    save_pretrained(Transformer(get_config(config)), os.path.join(folder, "model"), tok)
    return os.path.join(folder, "model")


def start_server(ckpt: str, port: int, threads: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "generate.py", f"ckpt={ckpt}", "serve=true",
                             f"port={port}", "max_batch=32", "served_model_name=bench",
                             "dtype=float32"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit("the server exited at start")
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start")


def ask(port: int, body: dict) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions",
                                      data=json.dumps(body).encode(),
                                      headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())["usage"]["completion_tokens"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--min-new", type=int, default=16)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    rng = random.Random(1)
    bodies = [{"model": "bench", "prompt": " ".join(rng.choice(WORDS) for _ in range(
        rng.randint(4, 40))), "max_tokens": rng.randint(args.min_new, args.max_new),
        "temperature": 1.0, "seed": i} for i in range(args.clients)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        proc = start_server(checkpoint(folder, args.config), port, args.threads)
        try:
            ask(port, bodies[0])  # warm-up
            t0 = time.perf_counter()
            alone = sum(ask(port, b) for b in bodies)
            t1 = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                together = sum(pool.map(lambda b: ask(port, b), bodies))
            t2 = time.perf_counter()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    one, many = alone / (t1 - t0), together / (t2 - t1)
    print(f"server ({args.config}, {args.threads} threads): {args.clients} requests, "
          f"{alone} tokens one at a time in {t1 - t0:.2f} s, {together} tokens concurrently "
          f"in {t2 - t1:.2f} s")
    print(f"tokens/s: ours {many:.1f} ({args.clients} concurrent clients), baseline "
          f"{one:.1f} (one at a time), ratio {many / one:.2f}")


if __name__ == "__main__":
    main()
