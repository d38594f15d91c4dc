"""Long prompts: peak memory of chunked prefill against one forward, and decode speed at long
context against short (issue #36, "long prompts in inference").

    python bench/long_prompt.py [--config tiny] [--prompt 65536] [--chunk 4096] [--short 1024]
                                [--one-shot 16384] [--new 32] [--device cpu] [--threads 2]

Prefill: the same random `--prompt`-token prompt into a fresh cache in one forward and in
`--chunk`-token forwards (`model/prefill.py`); peak bytes of the tensors each creates
(`train.memory.SectionPeak`: on CPU every storage the ops allocate, until freed), the seconds,
and whether the next-token logits agree, at `--one-shot` tokens (default `--prompt`; on the
24 GB development box a 64K-token one-forward prefill of the tiny preset was killed for memory
at 21.8 GB, which is the point of chunking), then the chunked prefill alone at `--prompt`.
Each line is printed as soon as it is measured. Decode: `--new` greedy tokens after a `--prompt`-token
and after a `--short`-token prompt, tokens/s of the decode phase. Prints `name: ours …,
baseline …, ratio …` lines. Weights are random: memory and speed do not depend on them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from model.config import get_config  # noqa: E402
from model.generation import generate  # noqa: E402
from model.prefill import prefill  # noqa: E402
from model.transformer import Transformer  # noqa: E402
from train.memory import SectionPeak  # noqa: E402


@torch.no_grad()
def prefill_peak(model, ids, chunk):
    lens = torch.tensor([ids.shape[1]], device=ids.device)
    mask = torch.ones_like(ids, dtype=torch.bool)
    cache = model.new_cache(1, ids.shape[1] + 1)
    t0 = time.perf_counter()
    with SectionPeak(ids.device) as peak:
        logits, _ = prefill(model, ids, mask, lens, cache, chunk, False)
    return peak.gib, time.perf_counter() - t0, logits


def decode_rate(model, prompt_len: int, new: int, vocab: int, device) -> float:
    prompt = torch.randint(2, vocab, (1, prompt_len)).tolist()
    s = generate(model, prompt, max_new_tokens=new, temperature=0, prefill_chunk=4096).stats
    return s["decode_tokens"] / s["decode_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--prompt", type=int, default=65536)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--short", type=int, default=1024)
    ap.add_argument("--one-shot", type=int, default=None,
                    help="prompt length of the one-forward comparison (default --prompt)")
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = get_config(args.config, max_seq_len=max(args.prompt + args.new + 1, 4096))
    torch.manual_seed(0)
    model = Transformer(cfg).to(args.device).eval()
    base = args.one_shot or args.prompt
    ids = torch.randint(2, cfg.vocab_size, (1, args.prompt), device=args.device)
    chunked_gib, chunked_s, chunked = prefill_peak(model, ids[:, :base], args.chunk)
    whole_gib, whole_s, whole = prefill_peak(model, ids[:, :base], None)
    diff = (chunked - whole).abs().max().item() / whole.abs().max().item()
    print(f"# {args.config} on {args.device}, {base}-token prompt, chunk {args.chunk}; "
          f"next-token logits max relative difference {diff:.1e}")
    print(f"prefill peak GiB @{base // 1024}K: ours (chunked) {chunked_gib:.2f}, baseline (one "
          f"forward) {whole_gib:.2f}, ratio {chunked_gib / whole_gib:.3f}", flush=True)
    print(f"prefill seconds @{base // 1024}K: ours (chunked) {chunked_s:.1f}, baseline (one "
          f"forward) {whole_s:.1f}, ratio {chunked_s / whole_s:.2f}", flush=True)
    del whole
    if args.prompt > base:
        gib, sec, _ = prefill_peak(model, ids, args.chunk)
        print(f"prefill @{args.prompt // 1024}K, chunked only: peak {gib:.2f} GiB, {sec:.1f} s "
              f"({args.prompt / sec:.0f} tok/s)", flush=True)
    long_rate = decode_rate(model, args.prompt, args.new, cfg.vocab_size, args.device)
    short_rate = decode_rate(model, args.short, args.new, cfg.vocab_size, args.device)
    print(f"decode tok/s at {args.prompt // 1024}K context: ours {long_rate:.1f}, baseline "
          f"({args.short}-token context) {short_rate:.1f}, ratio {long_rate / short_rate:.2f}")


if __name__ == "__main__":
    main()
