"""Section 5, generation: greedy decode tokens/s at batch 1, 8 and 32 with `model.generation
.generate` (KV cache), eager and with the model compiled (`torch.compile`, mode
"reduce-overhead": CUDA graphs on a GPU), and against transformers' `generate` on the same
weights exported with `model.convert.export_hf` (`bench/generate.compare_with_transformers`).
Weights are random: speed does not depend on them."""

from __future__ import annotations


import torch

from model.config import get_config
from model.generation import generate
from model.transformer import Transformer

from .common import Ctx, Result, bench_module, guarded

compare_with_transformers = bench_module("generate").compare_with_transformers

BATCHES = (1, 8, 32)


def decode_rate(ctx: Ctx, model, cfg, batch: int, prompt: int, new: int) -> float:
    prompts = torch.randint(0, cfg.vocab_size, (batch, prompt), device=ctx.device).tolist()
    generate(model, prompts, max_new_tokens=2, temperature=0)        # warm-up (and compile)
    best = 0.0
    for _ in range(1 if ctx.tiny else 3):
        s = generate(model, prompts, max_new_tokens=new, temperature=0).stats
        best = max(best, s["decode_tokens"] / s["decode_s"])
    return best


def run(ctx: Ctx) -> Result:
    r = Result("Generation: greedy decode tokens/s",
               ["model", "batch", "prompt → new", "eager tok/s", "compiled tok/s",
                "transformers tok/s", "ours / transformers"])
    name, prompt, new = ("tiny", 16, 8) if ctx.tiny else ("small", 512, 128)
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    cfg = get_config(name, max_seq_len=4096)
    torch.manual_seed(0)
    model = Transformer(cfg).to(ctx.device, dtype).eval()
    mode = "reduce-overhead" if ctx.cuda else None
    compiled = torch.compile(model, mode=mode, backend="inductor" if ctx.cuda else "eager")
    hf = {}
    try:
        import transformers  # noqa: F401
        rows = guarded(r, "transformers generate", lambda: compare_with_transformers(
            name, str(ctx.device), dtype, [(b, prompt, new) for b in BATCHES], 1 if ctx.tiny
            else 2))
        hf = {row["shape"][0]: row["transformers"] for row in rows or []}
    except ImportError:
        r.notes.append("transformers is not installed: its column is empty")
    for batch in BATCHES:
        if not ctx.tiny and ctx.left() < 20:
            r.failed.append(f"batch {batch}: skipped, the time budget ran out")
            continue
        eager = guarded(r, f"eager batch {batch}",
                        lambda: decode_rate(ctx, model, cfg, batch, prompt, new))
        comp = guarded(r, f"compiled batch {batch}",
                       lambda: decode_rate(ctx, compiled, cfg, batch, prompt, new))
        theirs = hf.get(batch)
        r.add(name, batch, f"{prompt} → {new}", eager, comp, theirs,
              f"{max(eager or 0, comp or 0) / theirs:.2f}×" if theirs and (eager or comp)
              else None)
    return r
