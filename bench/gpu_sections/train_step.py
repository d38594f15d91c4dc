"""Section 4, the training step: tokens/s and MFU of one optimizer step (forward, backward,
Muon+AdamW) for `small` and for flash's layer shapes cut to fit one GPU, eager and compiled,
activation checkpointing off and per block, and the peak memory beside the planner's figure.

MFU = tokens/s × `train.metrics.flops_per_token` (6 × activated parameters plus the attention
core, the count the README uses) / the GPU's dense bf16 peak (the env section). The planner
(`train.plan.make_plan`, one rank, ZeRO 0) plans the trainer's layout, with DeepSpeed's fp32
master weights; this step keeps bf16 weights and gradients and the optimizer's own fp32 state, so
the planner's total is an upper bound and the two are printed side by side.
"""

from __future__ import annotations

import torch

from model.config import get_config
from model.loss import compute_loss
from model.summary import count_parameters
from model.transformer import Transformer
from optim import build_optimizer
from train.activation import apply_activation_checkpointing
from train.metrics import flops_per_token
from train.plan import make_plan

from .common import Ctx, Result, guarded

COMPILE_MIN_S = 150.0  # compiling `small` takes a minute or two: only with this much budget left


def configs(ctx: Ctx) -> list[tuple[str, object, int, int]]:
    """(label, config, micro-batch, sequence length) of each model measured."""
    if ctx.tiny:
        cfg = get_config("tiny").replace(n_layers=2, compress_ratios=(0, 4, 0), dim=64,
                                         n_routed_experts=4, moe_inter_dim=32, vocab_size=512)
        return [("tiny (2 layers, dim 64)", cfg, 2, 64)]
    flash = get_config("flash")
    cut = flash.replace(n_layers=2, compress_ratios=(4, 128, 0), n_routed_experts=32,
                        n_hash_layers=1)
    return [("small", get_config("small"), 1, 4096),
            ("flash layers ×2, 32 experts", cut, 1, 4096)]


def measure(ctx: Ctx, r: Result, label: str, cfg, batch: int, seq: int, compiled: bool,
            checkpointing: str) -> None:
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    ctx.reset_peak()
    torch.manual_seed(0)
    with ctx.device:
        model = Transformer(cfg).to(dtype)
    apply_activation_checkpointing(model, checkpointing)
    # --tiny (CPU): dynamo only (backend "eager"), so the self-test needs no C++ toolchain
    forward = (torch.compile(model, backend="eager" if ctx.tiny else "inductor") if compiled
               else model)
    opt = build_optimizer(model, lr=1e-4, model_config=cfg)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=ctx.device)

    def step():
        opt.zero_grad(set_to_none=True)
        compute_loss(forward(ids), ids).total.backward()
        opt.step()

    ms = ctx.time_ms(step, reps=2 if ctx.tiny else 5, warmup=1 if ctx.tiny else 2)
    tokens_s = batch * seq / (ms * 1e-3)
    fpt = flops_per_token(cfg, count_parameters(cfg).activated, seq)
    mfu = tokens_s * fpt / (ctx.peak_tflops * 1e12) if ctx.peak_tflops else None
    plan = make_plan(cfg, world=1, ep=1, micro_batch=batch, seq_len=seq, global_batch=batch,
                     bf16=ctx.cuda, checkpointing=checkpointing)
    peak = ctx.peak_gib()
    r.add(label, f"{batch}×{seq}", "compiled" if compiled else "eager", checkpointing, ms,
          tokens_s, mfu, peak, plan.total / 2**30)
    del model, opt, forward


def run(ctx: Ctx) -> Result:
    r = Result("Training step (forward + backward + Muon/AdamW step)",
               ["model", "tokens", "mode", "act. ckpt", "step ms", "tokens/s", "MFU",
                "peak GiB", "planner GiB"])
    for label, cfg, batch, seq in configs(ctx):
        variants = [(False, "off"), (False, "block")]
        if ctx.tiny or ctx.left() > COMPILE_MIN_S:
            variants.append((True, "off"))
        for compiled, ckpt in variants:
            if not ctx.tiny and ctx.left() < 30:
                r.failed.append(f"{label} {ckpt}: skipped, the time budget ran out")
                continue
            guarded(r, f"{label} {'compiled' if compiled else 'eager'} ckpt={ckpt}",
                    lambda: measure(ctx, r, label, cfg, batch, seq, compiled, ckpt))
    r.notes.append("MFU: tokens/s × train.metrics.flops_per_token / dense bf16 peak"
                   + ("" if ctx.peak_tflops else " (peak unknown here: not computed)"))
    return r
