"""Token log-probabilities of generated tokens under the policy being trained (the sampler's
kept sets, at its temperature), and how often the live routers agree with replayed routes:
what GRPO's objective and distillation's importance weights read from a training forward."""

from __future__ import annotations

from typing import Any

import torch

from model.sampling import logprobs_over_kept

from rl.rollout_batch import kept_sets


def token_logprobs(model, batch: dict[str, Any], temperature: float, routes=None,
                   entropy: bool = False):
    """(log π [b, L-1] fp32 at the generated positions (0 elsewhere), renormalised over the kept
    sets at `temperature`; entropy [b, L-1] of that distribution over the full vocabulary, or
    None; the forward's output)."""
    out = model(batch["input_ids"], token_mask=batch["token_mask"], routes=routes, mtp=False)
    logits = out.logits[:, :-1]                                  # [b, L-1, vocab]
    sel = batch["gen_mask"] > 0                                  # [b, L-1]
    targets = batch["input_ids"][:, 1:][sel]                     # [N]
    picked = logits[sel]                                         # [N, vocab]
    lp = logprobs_over_kept(picked, targets, kept_sets(batch), temperature)  # [N] fp32
    logp = torch.zeros(sel.shape, dtype=torch.float32, device=lp.device)
    logp = logp.masked_scatter(sel, lp)
    ent = None
    if entropy:
        with torch.no_grad():
            z = torch.log_softmax(picked.float() / temperature, dim=-1)  # [N, vocab]
            ent = torch.zeros_like(logp).masked_scatter(sel, -(z.exp() * z).sum(-1))
    return logp, ent, out


def route_agreement(replayed: torch.Tensor, live: list) -> torch.Tensor:
    """[b, L-1]: per input position, the fraction of replayed (layer, expert) picks the live
    router also picks, over the layers that were replayed."""
    parts = []
    for layer, lv in enumerate(live[:replayed.shape[2]]):
        if lv is None:
            continue
        r = replayed[:, :, layer].long()                          # [b, L, k]
        hit = (r[..., :, None] == lv[..., None, :]).any(-1)        # [b, L, k]
        parts.append(hit.float().mean(-1))
    if not parts:
        return torch.ones(replayed.shape[0], replayed.shape[1] - 1, device=replayed.device)
    return torch.stack(parts).mean(0)[:, :-1]
