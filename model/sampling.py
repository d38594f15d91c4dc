"""Token sampling: temperature, top-k, top-p, greedy; exact categorical draws from a seeded
generator.

`sampling_distribution` returns the log-probabilities actually sampled from together with the
kept-token mask. GRPO needs both (posttraining.md §1.2): the mask is the "keep sampling mask"
(training renormalises the policy over the same kept set) and the log-probability of the drawn
token is π_old under that renormalised distribution.

A dense `[tokens, vocab]` mask is far too big to keep for a rollout (16K tokens × 129K vocab is
~2 GB of bools), so rollouts store the kept sets as index lists (`KeptSets`, CSR), and training
renormalises over them with `logprobs_over_kept` without ever building the dense mask. When
sampling cannot drop a token (`restricts` is False) nothing is stored at all: the kept set is
the whole vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor


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


def restricts(params: SamplingParams, vocab: int | None = None) -> bool:
    """True when sampling with `params` can drop tokens, i.e. kept sets must be stored: greedy,
    top-p < 1, or top-k > 0 (below `vocab`, when given; `sampling_distribution` ignores a top-k
    of at least the vocabulary). False: every kept set is the whole vocabulary."""
    if params.greedy or params.top_p < 1:
        return True
    return params.top_k > 0 and (vocab is None or params.top_k < vocab)


@dataclass(eq=False)  # tensors: == would be elementwise, so compare fields yourself
class KeptSets:
    """The kept-token set of each sampling step, as index lists (CSR).

    Row r's kept ids are `ids[offsets[r]:offsets[r] + counts[r]]`, ascending. Every row keeps at
    least one token (sampling always keeps the most likely one), so empty rows are rejected:
    a row with nothing kept cannot have produced a token. Typically on CPU (what a rollout
    stores); `logprobs_over_kept` moves the indices to the logits' device."""

    ids: Tensor     # [nnz] int32 token ids, row after row, ascending within a row
    counts: Tensor  # [rows] int32, kept tokens per row

    def __post_init__(self):
        for name in ("ids", "counts"):
            t = getattr(self, name)
            if not isinstance(t, Tensor) or t.dim() != 1 or t.dtype != torch.int32:
                raise ValueError(f"KeptSets.{name}: expected a 1-D int32 tensor, got "
                                 f"{getattr(t, 'dtype', type(t))} "
                                 f"{tuple(getattr(t, 'shape', ()))}")
        if self.counts.numel() and int(self.counts.min()) < 1:
            row = int((self.counts < 1).nonzero()[0])
            raise ValueError(f"KeptSets.counts[{row}]={int(self.counts[row])}: every row keeps "
                             f"at least one token")
        total = int(self.counts.sum())
        if total != self.ids.numel():
            raise ValueError(f"KeptSets: counts sum to {total} but ids has {self.ids.numel()} "
                             f"entries")

    @classmethod
    def from_mask(cls, mask: Tensor) -> "KeptSets":
        """`[rows, vocab]` bool → the same sets as index lists (on the mask's device)."""
        if mask.dim() != 2 or mask.dtype != torch.bool:
            raise ValueError(f"mask: expected [rows, vocab] bool, got {mask.dtype} "
                             f"{tuple(mask.shape)}")
        ids = mask.nonzero()[:, 1]  # row-major order: ascending ids within each row
        return cls(ids.to(torch.int32), mask.sum(1, dtype=torch.int32))

    def to_mask(self, vocab: int) -> Tensor:
        """→ `[rows, vocab]` bool (tests and debugging; this is the dense form being avoided)."""
        if self.ids.numel() and (int(self.ids.min()) < 0 or int(self.ids.max()) >= vocab):
            raise ValueError(f"KeptSets.to_mask: ids outside [0, {vocab})")
        mask = torch.zeros(len(self), vocab, dtype=torch.bool, device=self.ids.device)
        mask[self.row_index(), self.ids.long()] = True
        return mask

    @staticmethod
    def cat(parts: Sequence["KeptSets"]) -> "KeptSets":
        """Rows of `parts` one after the other (no parts: zero rows)."""
        if not parts:
            return KeptSets(torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.int32))
        return KeptSets(torch.cat([p.ids for p in parts]), torch.cat([p.counts for p in parts]))

    def __len__(self) -> int:
        return self.counts.numel()

    @property
    def offsets(self) -> Tensor:
        """`[rows + 1]` int64: row r is `ids[offsets[r]:offsets[r + 1]]`."""
        return torch.cat((self.counts.new_zeros(1, dtype=torch.int64),
                          self.counts.long().cumsum(0)))

    def row_index(self) -> Tensor:
        """`[nnz]` int64: the row of each entry of `ids`."""
        rows = torch.arange(len(self), device=self.counts.device)
        return torch.repeat_interleave(rows, self.counts.long(), output_size=self.ids.numel())

    def select(self, rows: Tensor | Sequence[int]) -> "KeptSets":
        """The given rows, in the given order (e.g. a minibatch's tokens)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.counts.device).reshape(-1)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= len(self)):
            raise ValueError(f"KeptSets.select: rows outside [0, {len(self)})")
        counts = self.counts[rows]
        starts = self.offsets[:-1][rows]
        within = torch.arange(int(counts.sum()), device=rows.device) - torch.repeat_interleave(
            counts.long().cumsum(0) - counts.long(), counts.long())
        index = torch.repeat_interleave(starts, counts.long()) + within
        return KeptSets(self.ids[index], counts)

    def to(self, device) -> "KeptSets":
        return KeptSets(self.ids.to(device), self.counts.to(device))


def logprobs_over_kept(logits: Tensor, tokens: Tensor, kept: KeptSets | None,
                       temperature: float) -> Tensor:
    """log softmax(logits / temperature) renormalised over each row's kept set, at `tokens`.

    logits `[N, vocab]` (any float dtype; computed in fp32), tokens `[N]` int, kept: N rows or
    None (the whole vocabulary) → `[N]` fp32, differentiable w.r.t. logits. This is π_θ under
    the rollout's own truncation ("keep sampling mask"), the same quantity as the log-prob
    `sampling_distribution` gives the drawn token. With `kept`, only the kept logits are
    gathered (by (row, id) pairs) and the per-row logsumexp uses segment ops (scatter amax for
    the max, index_add for the sum): no `[N, vocab]` mask or fp32 copy is built, and the
    gradient (one-hot minus the renormalised softmax on the kept set, 0 elsewhere) is that of
    the dense masked log_softmax. A token outside its row's kept set is an error (it cannot
    have been sampled from it)."""
    if not temperature > 0:
        raise ValueError(f"temperature={temperature}: must be > 0 (greedy kept sets hold one "
                         f"token, whose renormalised log-prob is 0 at any temperature)")
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits: expected float [N, vocab], got {logits.dtype} "
                         f"{tuple(logits.shape)}")
    n, vocab = logits.shape
    if tokens.shape != (n,) or tokens.is_floating_point():
        raise ValueError(f"tokens: expected integer [{n}], got {tokens.dtype} "
                         f"{tuple(tokens.shape)}")
    tokens = tokens.to(logits.device).long()
    if n and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
        raise ValueError(f"tokens: ids must lie in [0, {vocab})")
    picked = logits.gather(1, tokens[:, None])[:, 0].float() / temperature  # [N]
    if kept is None:
        return picked - torch.logsumexp(logits.float() / temperature, dim=-1)
    if len(kept) != n:
        raise ValueError(f"kept: {len(kept)} rows for {n} logits rows")
    kept = kept.to(logits.device)
    ids = kept.ids.long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"kept.ids: ids must lie in [0, {vocab})")
    row = kept.row_index()                                                  # [nnz]
    hits = torch.zeros(n, dtype=torch.int32, device=logits.device).index_add_(
        0, row, (ids == tokens[row]).to(torch.int32))
    if n and not bool(hits.all()):
        bad = int((hits == 0).nonzero()[0])
        raise ValueError(f"tokens[{bad}]={int(tokens[bad])}: outside row {bad}'s kept set "
                         f"(it cannot have been sampled from it)")
    values = logits[row, ids].float() / temperature                         # [nnz]
    top = torch.full((n,), float("-inf"), device=logits.device).scatter_reduce(
        0, row, values.detach(), reduce="amax")                             # [N] (a shift only)
    total = torch.zeros(n, device=logits.device).index_add(0, row, (values - top[row]).exp())
    return picked - (top + total.log())


def draw(logp: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from log-probs `[batch, vocab]`: argmax of p / Exp(1) noise (an exact
    categorical draw, reproducible with `generator`). → `[batch]` int64."""
    noise = torch.empty_like(logp).exponential_(1, generator=generator)
    return (logp.exp() / noise).argmax(dim=-1)
