"""A GRPO-shaped rollout through the engine (`model/engine.py`) against `model.generation`:
B prompts x G samples with ragged prompt and answer lengths, greedy on random weights.

    python bench/rollout_engine.py [--config tiny] [--prompts 16] [--group 8] [--min-new 4]
                                   [--max-new 64] [--max-batch 128] [--repeat 2] [--threads 2]
                                   [--sample] [--compile]

Answers end by EOS, as in a rollout: the EOS id is the token that a probe run (greedy, the B
prompts) first produces, between --min-new and --max-new tokens in, for the most prompts, so
answer lengths are ragged; a row that never produces it stops at --max-new. Both runs decode
the same tokens (greedy; checked). `generate` runs what GRPO runs today: all B·G rows in one
batch, every sample prefilling its prompt again, finished rows dropped. The engine prefills
each prompt once, forks it to its G samples, and refills rows (`--max-batch` < B·G). Prints
tokens/s (generated tokens), best of --repeat, and the ratio; one machine, one seed.

`--sample`: temperature 1 instead (what GRPO runs), so the G samples of a prompt differ and end
at different lengths (EOS made likely enough that answers average (min-new + max-new) / 2
tokens, `sampled_eos`). The two runs draw differently, so only their tokens/s are compared.

`--compile`: the engine's decode step through `torch.compile` (`Engine(compile=True)`); one
untimed engine run compiles first and its time is printed as the compile time.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from model.config import get_config  # noqa: E402
from model.engine import Engine  # noqa: E402
from model.generation import generate  # noqa: E402
from model.transformer import Transformer  # noqa: E402


def workload(args, vocab: int):
    rng = random.Random(0)
    return [[0] + [rng.randrange(2, vocab) for _ in range(rng.randint(8, 48))]
            for _ in range(args.prompts)]


def pick_eos(model, prompts, lo: int, hi: int) -> int:
    """The token first produced between `lo` and `hi` tokens in by the most prompts."""
    probe = generate(model, prompts, max_new_tokens=hi, temperature=0.0)
    votes: dict[int, int] = {}
    for toks in probe.tokens:
        for t in {t for t in toks[lo:hi] if t not in toks[:lo]}:
            votes[t] = votes.get(t, 0) + 1
    return max(votes, key=votes.get)


def sampled_eos(model, prompts, args) -> int:
    """A random model samples nearly uniformly from its vocabulary, so no token would end rows
    at GRPO-like lengths: the EOS row of the output head (token 1) is scaled until a sampled
    probe's answers are (min-new + max-new) / 2 tokens long on average (bisection on the
    scale), which makes lengths ragged and context-dependent. Returns the EOS id."""
    eos, target = 1, (args.min_new + args.max_new) / 2
    rows = [p for p in prompts for _ in range(args.group)]
    row = model.head.weight.data[eos].clone()
    lo, hi = 1.0, 1000.0
    for _ in range(12):
        mid = (lo * hi) ** 0.5
        model.head.weight.data[eos] = row * mid
        out = generate(model, rows, max_new_tokens=args.max_new, temperature=1.0, seed=1,
                       eos_id=eos)
        mean = sum(len(t) for t in out.tokens) / len(rows)
        lo, hi = (mid, hi) if mean > target else (lo, mid)
    return eos


def run_generate(model, prompts, args, eos: int):
    rows = [p for p in prompts for _ in range(args.group)]
    t0 = time.perf_counter()
    out = generate(model, rows, max_new_tokens=args.max_new, temperature=args.temperature,
                   eos_id=eos, seed=0)
    return time.perf_counter() - t0, out.tokens


def run_engine(model, prompts, args, eos: int):
    engine = Engine(model, max_batch=args.max_batch, temperature=args.temperature, eos_id=eos,
                    seed=0, compile=args.compile)
    t0 = time.perf_counter()
    ids = [engine.add(p, n=args.group, max_new_tokens=args.max_new) for p in prompts]
    out = engine.run()
    return time.perf_counter() - t0, [t for i in ids for t in out[i].tokens]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--min-new", type=int, default=4)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sample", action="store_true", help="temperature 1 (see docstring)")
    ap.add_argument("--compile", action="store_true", help="compiled decode step")
    args = ap.parse_args()
    args.temperature = 1.0 if args.sample else 0.0
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Transformer(get_config(args.config)).float().eval()
    prompts = workload(args, model.cfg.vocab_size)
    eos = (sampled_eos(model, prompts, args) if args.sample
           else pick_eos(model, prompts, args.min_new, args.max_new))
    base = min((run_generate(model, prompts, args, eos) for _ in range(args.repeat)),
               key=lambda r: r[0])
    if args.compile:
        seconds = run_engine(model, prompts, args, eos)[0]
        print(f"compile: first engine run {seconds:.1f} s (compiling the decode step)")
    ours = min((run_engine(model, prompts, args, eos) for _ in range(args.repeat)),
               key=lambda r: r[0])
    if not args.sample and ours[1] != base[1]:
        raise SystemExit("the engine's tokens differ from generate's")
    tokens, rate = [], []
    for name, (seconds, rows) in (("generate", base), ("engine", ours)):
        tokens.append(sum(len(t) for t in rows))
        rate.append(tokens[-1] / seconds)
        lengths = sorted(len(t) for t in rows)
        print(f"{name}: {tokens[-1]} tokens in {seconds:.2f} s, answers {lengths[0]}-"
              f"{lengths[-1]} (median {lengths[len(lengths) // 2]})")
    print(f"rollout {args.prompts} x {args.group} ({args.config}, "
          f"{'T=1' if args.sample else 'greedy'}, {args.threads} threads, max_batch "
          f"{args.max_batch}) tokens/s: ours {rate[1]:.1f} (engine), baseline {rate[0]:.1f} "
          f"(generate), ratio {rate[1] / rate[0]:.2f}")


if __name__ == "__main__":
    main()
