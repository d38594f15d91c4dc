"""MTP speculative decoding against plain cached decoding, same weights, same prompts.

    python bench/speculative.py [--ckpt runs/tiny/checkpoints/step_00000100] [--device cpu]
                                [--dtype float32] [--configs 1x64x64,8x64x64,32x32x32]

For each configuration (batch × prompt tokens → new tokens) and each of greedy and sampled
(temperature 1) decoding, `model.generation.generate` runs once plainly and once with
`speculative=True`. Prints the MTP block's acceptance rate, decode tokens/s of both and their
ratio, and for greedy how many rows came out identical (all of them, unless two logits tie to
rounding). Acceptance depends on how well the MTP block predicts, so it needs trained weights:
the default is the README's main job; prompts are slices of the Python standard library's
sources (the default corpus), tokenised with the checkpoint's tokenizer. One warm-up run per
mode comes first. Prints `name: ours …, baseline …, ratio …` lines.

`--engine`: the same comparison inside the rollout engine, `model.engine.Engine` against
`model.speculative_engine.SpeculativeEngine` (one request per prompt, `max_batch` = batch);
tokens/s there are generated tokens over the whole run (the prefill, identical in both, is
included), best of two runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from model.generation import generate  # noqa: E402
from train.loading import load_model_and_tokenizer  # noqa: E402


def corpus_prompts(tokenizer, batch: int, length: int) -> list[list[int]]:
    """`batch` prompts of `length` tokens from the standard library's own sources."""
    import inspect
    import json
    import textwrap

    text = "\n".join(inspect.getsource(m) for m in (json, textwrap, argparse))
    ids = tokenizer.encode(text, add_special_tokens=False)
    stride = max(1, (len(ids) - length) // max(batch, 1))
    return [ids[i * stride:i * stride + length] for i in range(batch)]


def run(model, prompts, new: int, temperature: float, speculative: bool):
    generate(model, [p[:8] for p in prompts[:2]], max_new_tokens=4, temperature=temperature,
             seed=0, speculative=speculative)  # warm-up
    return generate(model, prompts, max_new_tokens=new, temperature=temperature, seed=0,
                    speculative=speculative)


def run_engine(model, prompts, new: int, temperature: float, speculative: bool):
    """(generated tokens / wall seconds, tokens, acceptance) of the engine, best of two."""
    import time

    from model.engine import Engine
    from model.speculative_engine import SpeculativeEngine

    best = None
    for _ in range(2):
        engine = (SpeculativeEngine if speculative else Engine)(
            model, max_batch=len(prompts), temperature=temperature, seed=0)
        t0 = time.perf_counter()
        ids = [engine.add(p, max_new_tokens=new) for p in prompts]
        out = engine.run()
        seconds = time.perf_counter() - t0
        tokens = [out[i].tokens[0] for i in ids]
        rate = sum(map(len, tokens)) / seconds
        accepted = engine.stats.get("accepted", 0) / max(engine.stats.get("drafted", 0), 1)
        if best is None or rate > best[0]:
            best = (rate, tokens, accepted)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="runs/tiny/checkpoints/step_00000100")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--configs", default="1x64x64,8x64x64,32x32x32")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--engine", action="store_true", help="inside the rollout engine")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not Path(args.ckpt).exists():
        sys.exit(f"error: --ckpt {args.ckpt}: not found (run the README's main job first, or "
                 f"pass a trained checkpoint: acceptance needs trained MTP weights)")
    model, tokenizer = load_model_and_tokenizer(args.ckpt, None, args.device, args.dtype, None)
    model.eval()
    print(f"# {args.ckpt} on {args.device} ({args.dtype}), torch threads "
          f"{torch.get_num_threads()}")
    for spec in args.configs.split(","):
        batch, length, new = (int(x) for x in spec.split("x"))
        prompts = corpus_prompts(tokenizer, batch, length)
        for name, temperature in (("greedy", 0.0), ("sampled", 1.0)):
            if args.engine:
                base, plain_tokens, _ = run_engine(model, prompts, new, temperature, False)
                ours, tokens, accepted = run_engine(model, prompts, new, temperature, True)
                same = (f", identical rows {sum(a == b for a, b in zip(tokens, plain_tokens))}"
                        f"/{batch}" if temperature == 0 else "")
                print(f"speculative engine tok/s {spec} {name}: ours {ours:.1f}, baseline "
                      f"(the engine without drafts) {base:.1f}, ratio {ours / base:.2f}x; MTP "
                      f"acceptance {accepted:.2f}{same}", flush=True)
                continue
            plain = run(model, prompts, new, temperature, False)
            fast = run(model, prompts, new, temperature, True)
            ours = fast.stats["decode_tokens"] / fast.stats["decode_s"]
            base = plain.stats["decode_tokens"] / plain.stats["decode_s"]
            accepted = fast.stats["accepted"] / max(fast.stats["drafted"], 1)
            same = (f", identical rows {sum(a == b for a, b in zip(fast.tokens, plain.tokens))}"
                    f"/{batch}" if temperature == 0 else "")
            print(f"speculative decode tok/s {spec} {name}: ours {ours:.1f}, baseline (plain "
                  f"cached decoding) {base:.1f}, ratio {ours / base:.2f}x; MTP acceptance "
                  f"{accepted:.2f}{same}", flush=True)


if __name__ == "__main__":
    main()
