"""Data pipeline throughput on this machine: tokenisation (tokens/s) and the training loader
(batches/s) at the tiny and small presets' batch shapes, on the default stdlib corpus.

    python bench/data.py [--cache-dir DIR] [--max-files N] [--seconds 3]

tokenise: ours = `build_token_shard` end to end (read JSONL through `datasets`, batched
  multi-threaded `encode_batch_fast`, hash, append to memory-mapped shard files), into a fresh
  cache; baseline = a plain script, also end to end: `json.loads` per line, one Hugging Face
  tokenizer call per document, one array saved at the end.
loader: ours = the training loader with its background prefetch worker; baseline = the same
  loader building each batch synchronously (prefetch=0). Two figures per shape: raw batches/s
  with a consumer that does nothing else (the worker's hand-off costs a little here), and the
  time a training step waits for data when each step spends --step-ms in GIL-free work (what
  prefetching is for). Shapes: tiny = 8 x 512,
  small = 4 x 4096 (micro_batch x seq_len; override with --shapes). Both read the same memory-
  mapped shard; the small model's 129k vocabulary changes only the shard dtype.
Prints `name: ours …, baseline …, ratio …` lines.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _naive_tokenise(train_jsonl: Path, tokenizer, out: Path) -> int:
    """What a plain prepare script does: json per line, one tokenizer call per document, one
    array saved at the end."""
    import numpy as np

    ids: list[int] = []
    with open(train_jsonl, encoding="utf-8") as f:
        for line in f:
            ids.extend(tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"])
            ids.append(tokenizer.eos_token_id)
    np.save(out, np.asarray(ids, dtype=np.uint32))
    return len(ids)


def bench_tokenise(train_jsonl: Path, tokenizer) -> None:
    from data.config import SourceConfig
    from data.shards import build_token_shard
    from data.sources import resolve_source

    n_mb = train_jsonl.stat().st_size / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        shard = build_token_shard(resolve_source(SourceConfig(str(train_jsonl))), tokenizer,
                                  Path(tmp), progress=False)
        ours_s = time.perf_counter() - t0
        n_tokens = shard.meta["n_tokens"]
        t0 = time.perf_counter()
        n_base = _naive_tokenise(train_jsonl, tokenizer, Path(tmp) / "naive.npy")
        base_s = time.perf_counter() - t0
    ours, base = n_tokens / ours_s, n_base / base_s
    print(f"tokenise ({shard.n_docs} docs, {n_mb:.1f} MB JSONL, {n_tokens / 1e6:.2f}M tokens, "
          f"{os.cpu_count()} cores, end to end): ours {ours / 1e6:.2f}M tokens/s, baseline "
          f"(json + one HF call per document) {base / 1e6:.2f}M tokens/s, ratio {ours / base:.2f}x")


def _rate(loader, seconds: float) -> float:
    """Batches/s when the consumer does nothing but take batches."""
    for _ in range(5):  # warm-up: epoch index arrays, worker start
        next(loader)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        next(loader)
        n += 1
    rate = n / (time.perf_counter() - t0)
    loader.close()
    return rate


def _wait(loader, step_s: float, steps: int) -> float:
    """Mean seconds a training step waits in `next(loader)` when each step also spends
    `step_s` in work that releases the GIL (as a GPU step or a torch op does)."""
    for _ in range(5):
        next(loader)
    waited = 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        next(loader)
        waited += time.perf_counter() - t0
        time.sleep(step_s)
    loader.close()
    return waited / steps


def bench_loader(cfg, tokenizer, name: str, micro_batch: int, seq_len: int,
                 seconds: float, step_ms: float) -> None:
    from dataclasses import replace

    from data.pretrain import build_pretrain_loader

    def make(prefetch: int):
        return build_pretrain_loader(replace(cfg, prefetch=prefetch), tokenizer, seq_len,
                                     micro_batch)

    ours, base = _rate(make(8), seconds), _rate(make(0), seconds)
    shape = f"{micro_batch}x{seq_len}"
    print(f"loader {name} ({shape}) throughput: ours {ours:.0f} batches/s "
          f"({ours * micro_batch * seq_len / 1e6:.1f}M tokens/s, prefetch worker), baseline "
          f"{base:.0f} batches/s (synchronous), ratio {ours / base:.2f}x")
    steps = max(20, int(seconds / (step_ms / 1e3)))
    w_ours, w_base = _wait(make(8), step_ms / 1e3, steps), _wait(make(0), step_ms / 1e3, steps)
    print(f"loader {name} ({shape}) wait per {step_ms:g} ms step: ours {w_ours * 1e6:.0f} us, "
          f"baseline (synchronous) {w_base * 1e6:.0f} us, ratio {w_base / max(w_ours, 1e-9):.1f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache-dir", default=None, help="default: $V4LAB_CACHE or ~/.cache/v4lab")
    p.add_argument("--max-files", type=int, default=None, help="stdlib subset (default: all)")
    p.add_argument("--seconds", type=float, default=3.0, help="timing window per loader case")
    p.add_argument("--shapes", nargs="*", default=["tiny:8x512", "small:4x4096"])
    p.add_argument("--step-ms", type=float, default=5.0, help="simulated training step")
    args = p.parse_args()

    from data.config import DataConfig
    from data.prepare import ensure_default_assets
    from data.pretrain import prepare_pretrain
    from encoding.tokenizer import load_tokenizer

    t0 = time.perf_counter()
    assets = ensure_default_assets(args.cache_dir, 8192, max_files=args.max_files)
    print(f"prepare (corpus + 8192 BPE, cached after the first run): "
          f"{time.perf_counter() - t0:.1f}s")
    tokenizer = load_tokenizer(str(assets.tokenizer))
    bench_tokenise(assets.train, tokenizer)

    cfg = DataConfig(cache_dir=args.cache_dir, default_max_files=args.max_files, progress=False)
    prepare_pretrain(cfg, tokenizer)  # shards cached before the loader timings
    for spec in args.shapes:
        name, shape = spec.split(":")
        micro_batch, seq_len = (int(x) for x in shape.split("x"))
        bench_loader(cfg, tokenizer, name, micro_batch, seq_len, args.seconds, args.step_ms)


if __name__ == "__main__":
    main()
