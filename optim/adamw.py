"""AdamW for the parameters Muon should not touch (embedding, head, norms, mHC base/scale, ...).

Written out here (rather than wrapping torch.optim.AdamW) so one optimizer object owns both
halves: one `step`, one `state_dict`, one set of param groups for LR schedulers and DeepSpeed.
State is fp32 whatever the parameter dtype. DeepSeek-V4 settings: β = (0.9, 0.95), ε = 1e-20,
decoupled weight decay 0.1. With ε that small the update is ≈ sign-like where the second moment
is tiny; an all-zero gradient still gives a zero update (0 / 1e-20).
"""

from __future__ import annotations

import math

import torch


def adamw_init(p: torch.Tensor, state: dict) -> None:
    """Creates the fp32 moments and the step counter (a CPU scalar: reading it never syncs)."""
    if "step" in state:  # (the state may already hold a sharded run's fp32 master)
        return
    state["step"] = torch.zeros((), dtype=torch.float32)
    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32,
                                           memory_format=torch.preserve_format)


def adamw_step(p: torch.Tensor, grad: torch.Tensor, state: dict, *, lr: float,
               betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """One AdamW update of `p` in place; creates `state` entries on first use."""
    adamw_init(p, state)
    beta1, beta2 = betas
    state["step"] += 1
    step = int(state["step"].item())
    g = grad.float()
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bc1 = 1 - beta1 ** step
    bc2 = 1 - beta2 ** step
    denom = v.sqrt().div_(math.sqrt(bc2)).add_(eps)
    p.mul_(1 - lr * weight_decay)
    upd = m.div(denom).mul_(lr / bc1)
    p.sub_(upd.to(p.dtype))
