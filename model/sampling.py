"""Token sampling: temperature, top-k, top-p, greedy; exact categorical draws from a seeded
generator.

`sampling_distribution` returns the log-probabilities actually sampled from together with the
kept-token mask. GRPO needs both (posttraining.md §1.2): the mask is the "keep sampling mask"
(training renormalises the policy over the same kept set) and the log-probability of the drawn
token is π_old under that renormalised distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0        # nucleus mass kept, (0, 1]
    top_k: int = 0            # 0 = off

    def validate(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0 (0 = off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sampling_distribution(logits: torch.Tensor, params: SamplingParams):
    """logits `[batch, vocab]` → (log-probs `[batch, vocab]` fp32 of the distribution sampled
    from, −inf outside the kept set; kept mask `[batch, vocab]` bool).

    Order: temperature, then top-k, then top-p on what top-k kept; the most likely token is
    always kept. Greedy keeps exactly the argmax (log-prob 0)."""
    logits = logits.float()
    if params.greedy:
        keep = torch.zeros_like(logits, dtype=torch.bool)
        keep.scatter_(1, logits.argmax(-1, keepdim=True), True)
    else:
        logits = logits / params.temperature
        keep = torch.ones_like(logits, dtype=torch.bool)
        if params.top_k and params.top_k < logits.shape[-1]:
            kth = logits.topk(params.top_k, dim=-1).values[:, -1:]  # [batch, 1]
            keep &= logits >= kth
        if params.top_p < 1:
            probs = torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1)
            sorted_p, order = probs.sort(dim=-1, descending=True)
            before = sorted_p.cumsum(-1) - sorted_p  # mass strictly ahead of each token
            keep_sorted = before < params.top_p
            keep_sorted[:, 0] = True
            keep &= torch.zeros_like(keep).scatter(1, order, keep_sorted)
    logp = torch.log_softmax(logits.masked_fill(~keep, float("-inf")), dim=-1)
    return logp, keep


def draw(logp: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from log-probs `[batch, vocab]`: argmax of p / Exp(1) noise (an exact
    categorical draw, reproducible with `generator`). → `[batch]` int64."""
    noise = torch.empty_like(logp).exponential_(1, generator=generator)
    return (logp.exp() / noise).argmax(dim=-1)
