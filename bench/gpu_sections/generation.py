"""Section 5, generation: greedy decode tokens/s at batch 1, 8 and 32 with
`model.generation.generate` (the batch-synchronous loop), the rollout engine
(`model.engine.Engine`) eager and with its decode step compiled (`compile=True`: inductor with
`mode="reduce-overhead"`, i.e. CUDA graphs, on a GPU; the compile is untimed and its seconds
are reported), and transformers' `generate` on the same weights exported with
`model.convert.export_hf` (`bench/generate.compare_with_transformers`); then a GRPO-shaped
rollout (B prompts x G samples, ragged answers ending at EOS) through the engine against
`generate` (`bench/rollout_engine.py`'s workload). Weights are random: speed does not depend on
them. Issue #38's goals: >= 1.5x transformers at batch 1/8/32, >= 2x `generate` on the
rollout."""

from __future__ import annotations

import time
from argparse import Namespace

import torch

from model.config import get_config
from model.generation import generate
from model.transformer import Transformer

from .common import Ctx, Result, bench_module, guarded

BATCHES = (1, 8, 32)


def generate_rate(model, cfg, prompts: torch.Tensor, new: int) -> float:
    generate(model, prompts[:, :4].tolist(), max_new_tokens=2, temperature=0)  # warm-up
    s = generate(model, prompts.tolist(), max_new_tokens=new, temperature=0).stats
    return s["decode_tokens"] / s["decode_s"]


def engine_rate(gen_bench, model, prompts: torch.Tensor, new: int, compile) -> tuple:
    """(decode tok/s, compile seconds or None): a first untimed run compiles (or warms)."""
    t0 = time.perf_counter()
    gen_bench.compiled_engine(model, prompts, min(new, 4), compile)
    first = time.perf_counter() - t0
    seconds, _ = gen_bench.compiled_engine(model, prompts, new, compile)
    return prompts.shape[0] * new / max(seconds, 1e-9), (first if compile else None)


def rollout_row(ctx: Ctx, model) -> str:
    rb = bench_module("rollout_engine")
    args = Namespace(prompts=4, group=2, min_new=2, max_new=8, max_batch=8, temperature=0.0,
                     compile=False) if ctx.tiny else \
        Namespace(prompts=16, group=8, min_new=4, max_new=64, max_batch=128, temperature=0.0,
                  compile=False)
    prompts = rb.workload(args, model.cfg.vocab_size)
    eos = rb.pick_eos(model, prompts, args.min_new, args.max_new)
    rb.run_engine(model, prompts, args, eos)  # warm-up
    base = min((rb.run_generate(model, prompts, args, eos) for _ in range(2)), key=lambda r: r[0])
    ours = min((rb.run_engine(model, prompts, args, eos) for _ in range(2)), key=lambda r: r[0])
    tokens = sum(len(t) for t in base[1])
    same = "tokens equal" if ours[1] == base[1] else "TOKENS DIFFER"
    return (f"rollout {args.prompts} x {args.group} greedy (max_batch {args.max_batch}, answers "
            f"{args.min_new}-{args.max_new} tokens): engine {tokens / ours[0]:.0f} tok/s, "
            f"generate {tokens / base[0]:.0f} tok/s, ratio {base[0] / ours[0]:.2f}x ({same}; "
            f"goal >= 2x)")


def run(ctx: Ctx) -> Result:
    r = Result("Generation: greedy decode tokens/s",
               ["model", "batch", "prompt → new", "generate", "engine", "engine compiled",
                "compile s", "transformers", "best / transformers"])
    name, prompt, new = ("tiny", 16, 8) if ctx.tiny else ("small", 512, 128)
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    cfg = get_config(name, max_seq_len=4096)
    torch.manual_seed(0)
    model = Transformer(cfg).to(ctx.device, dtype).eval()
    gen_bench = bench_module("generate")
    hf = {}
    try:
        import transformers  # noqa: F401
        rows = guarded(r, "transformers generate", lambda: gen_bench.compare_with_transformers(
            name, str(ctx.device), dtype, [(b, prompt, new) for b in BATCHES], 1 if ctx.tiny
            else 2))
        hf = {row["shape"][0]: row["transformers"] for row in rows or []}
    except ImportError:
        r.notes.append("transformers is not installed: its column is empty")
    for batch in BATCHES:
        if not ctx.tiny and ctx.left() < 30:
            r.failed.append(f"batch {batch}: skipped, the time budget ran out")
            continue
        prompts = torch.randint(0, cfg.vocab_size, (batch, prompt), device=ctx.device)
        plain = guarded(r, f"generate batch {batch}",
                        lambda: generate_rate(model, cfg, prompts, new))
        eager = guarded(r, f"engine batch {batch}",
                        lambda: engine_rate(gen_bench, model, prompts, new, False)[0])
        comp, compile_s = None, None
        if ctx.cuda:  # on a CPU inductor's C++ build takes minutes per shape
            comp, compile_s = guarded(r, f"compiled engine batch {batch}", lambda: engine_rate(
                gen_bench, model, prompts, new, True)) or (None, None)
        theirs = hf.get(batch)
        best = max(v or 0 for v in (plain, eager, comp))
        r.add(name, batch, f"{prompt} → {new}", plain, eager, comp, compile_s, theirs,
              f"{best / theirs:.2f}×" if theirs and best else None)
    line = guarded(r, "rollout", lambda: rollout_row(ctx, model))
    if line:
        r.notes.append(line)
    if not ctx.cuda:
        r.notes.append("CPU: no compiled column (the compiled step is tested by "
                       "tests/inference/test_engine.py; `python bench/generate.py --compile` "
                       "measures it on a CPU)")
    return r
