"""On-policy distillation losses: the student's divergence from its teacher at every response
token (`../shared/docs/posttraining.md` §2.4), as pure functions on tensors.

    full     ℓ_t = Σ_v π_θ(v|s_t) · (log π_θ(v|s_t) − log π_T(v|s_t))    reverse KL, exact
    topk     the same over the teacher's top-k tokens plus one tail bucket holding the rest of
             each distribution's mass (cheaper: k + 1 terms; exact when k = vocab)
    sampled  the single-sample estimate log π_old(y_t) − log π_T(y_t) at the sampled token, used
             as a per-token advantage A_t = −(that) in an importance-weighted policy gradient,
             −(π_θ/π_old)(y_t)·A_t (Thinking Machines' recipe; the gradient at π_θ = π_old is
             that of the reverse KL's single-sample estimator)

Memory. At the released vocabulary (129,280) a `[tokens, vocab]` fp32 tensor is 8 GB per 16K
tokens, so no such tensor exists for more than one chunk of tokens at a time, for the student or
any teacher, in forward or backward: the functions take the head *inputs* (`hidden`, the
model's `forward(head=False)`) and the head weights, and apply the head chunk by chunk. Each
chunk runs under activation checkpointing (`torch.utils.checkpoint`), so the forward keeps only
the chunk's inputs and the backward recomputes the chunk's logits, takes its gradient and frees
it before the next. Log-softmax is in fp32 whatever the weights' dtype.

Keep Sampling Mask. When the sampler truncated (top-p / top-k), both distributions are
renormalised over the kept set of each position (`kept`, the rollout's index lists), so the KL
compares distributions on the support the student actually samples from; tokens outside it
contribute nothing. Without truncation (the default, temperature 1, top-p 1) the kept set is
the whole vocabulary and nothing is masked.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from model.sampling import KeptSets

KL_MODES = ("full", "topk", "sampled")


def kept_mask(kept: KeptSets | None, lo: int, hi: int, vocab: int,
              device: torch.device) -> Tensor | None:
    """Rows lo:hi of `kept` as a `[hi - lo, vocab]` bool mask (one chunk's worth), or None."""
    if kept is None:
        return None
    ids, counts = kept.ids.cpu(), kept.counts.cpu().long()
    offsets = torch.cumsum(counts, 0) - counts
    start, stop = int(offsets[lo]), int(offsets[hi - 1] + counts[hi - 1])
    rows = torch.repeat_interleave(torch.arange(hi - lo), counts[lo:hi])
    mask = torch.zeros(hi - lo, vocab, dtype=torch.bool)
    mask[rows, ids[start:stop].long()] = True
    return mask.to(device)


# outside a kept set: finite, so that 0 · (log p − log q) stays 0 in value and gradient (−inf
# would give 0 · (−inf) = nan in the backward); exp underflows to exactly 0 in fp32
OUTSIDE = -1e30


def _log_softmax(logits: Tensor, mask: Tensor | None) -> Tensor:
    z = logits.float()
    if mask is not None:
        z = z.masked_fill(~mask, OUTSIDE)
    return torch.log_softmax(z, dim=-1)


def reverse_kl_dense(student_logits: Tensor, teacher_logits: Tensor,
                     mask: Tensor | None = None) -> Tensor:
    """The reference: `[N, vocab]` logits (and an optional kept mask) → `[N]` fp32
    KL(π_student ‖ π_teacher), materialising everything at once."""
    ls, lt = _log_softmax(student_logits, mask), _log_softmax(teacher_logits, mask)
    return (ls.exp() * (ls - lt)).sum(-1)


def topk_reverse_kl_dense(student_logits: Tensor, teacher_logits: Tensor, k: int,
                          mask: Tensor | None = None) -> Tensor:
    """`[N]` reverse KL over the teacher's top-k tokens plus a tail bucket (the rest of each
    distribution's mass), from dense `[N, vocab]` logits."""
    ls, lt = _log_softmax(student_logits, mask), _log_softmax(teacher_logits, mask)
    k = min(k, lt.shape[-1])
    top = lt.topk(k, dim=-1).indices                             # [N, k]
    ls_top, lt_top = ls.gather(-1, top), lt.gather(-1, top)
    ps_top = ls_top.exp()
    # tail mass 1 − Σ top, clamped away from 0 so that log stays finite (fp32)
    tiny = torch.finfo(torch.float32).tiny
    ps_tail = (1 - ps_top.sum(-1)).clamp_min(tiny)
    pt_tail = (1 - lt_top.exp().sum(-1)).clamp_min(tiny)
    return (ps_top * (ls_top - lt_top)).sum(-1) + ps_tail * (ps_tail.log() - pt_tail.log())


def _over_chunks(fn, hidden: Tensor, head: Tensor, rows: tuple, extra: tuple,
                 kept: KeptSets | None, chunk: int) -> Tensor:
    """`[N]` = cat over token chunks of fn(hidden[c], head, *(r[c] for r in rows), *extra, mask
    of c), each chunk under activation checkpointing when a gradient is wanted (module
    docstring): one `[chunk, vocab]` working set at a time, forward and backward."""
    n, vocab = hidden.shape[0], head.shape[0]
    grad = torch.is_grad_enabled() and (hidden.requires_grad or head.requires_grad)
    parts = []
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        mask = kept_mask(kept, lo, hi, vocab, hidden.device)
        args = (hidden[lo:hi], head, *(r[lo:hi] for r in rows), *extra, mask)
        parts.append(checkpoint(fn, *args, use_reentrant=False) if grad else fn(*args))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def _chunk_kl(h_s: Tensor, w_s: Tensor, h_t: Tensor, w_t: Tensor, mode: str, k: int,
              mask: Tensor | None) -> Tensor:
    zs, zt = h_s @ w_s.t(), h_t @ w_t.t()                        # [c, vocab] each
    if mode == "full":
        return reverse_kl_dense(zs, zt, mask)
    return topk_reverse_kl_dense(zs, zt, k, mask)


def chunked_reverse_kl(student_hidden: Tensor, student_head: Tensor, teacher_hidden: Tensor,
                       teacher_head: Tensor, *, kept: KeptSets | None = None,
                       chunk: int = 1024, mode: str = "full", k: int = 32) -> Tensor:
    """Per-token reverse KL(π_θ ‖ π_T), `[N]` fp32, differentiable w.r.t. the student's hidden
    states and head weight; the teacher's side is treated as data.

    student_hidden `[N, dim]`, student_head `[vocab, dim]` (the student's `head.weight`),
    teacher_hidden `[N, dim_T]`, teacher_head `[vocab, dim_T]`; `kept`: N rows of kept sets, or
    None (the whole vocabulary). `mode`: full | topk (with `k`). At most `chunk` rows of
    `[rows, vocab]` exist at a time (module docstring)."""
    if mode not in ("full", "topk"):
        raise ValueError(f"mode={mode!r}: choose full or topk (sampled has its own function)")
    n = student_hidden.shape[0]
    if teacher_hidden.shape[0] != n:
        raise ValueError(f"teacher_hidden has {teacher_hidden.shape[0]} rows, the student {n}")
    if student_head.shape[0] != teacher_head.shape[0]:
        raise ValueError(f"vocabularies differ: student {student_head.shape[0]}, teacher "
                         f"{teacher_head.shape[0]}")
    if chunk < 1:
        raise ValueError(f"chunk={chunk}: must be >= 1")
    return _over_chunks(_chunk_kl, student_hidden, student_head, (teacher_hidden.detach(),),
                        (teacher_head.detach(), mode, k), kept, chunk)


def _chunk_token_logp(h: Tensor, w: Tensor, tokens: Tensor, mask: Tensor | None) -> Tensor:
    return _log_softmax(h @ w.t(), mask).gather(-1, tokens[:, None])[:, 0]


def chunked_token_logprobs(hidden: Tensor, head: Tensor, tokens: Tensor, *,
                           kept: KeptSets | None = None, chunk: int = 1024) -> Tensor:
    """log π(tokens) `[N]` fp32 from head inputs `[N, dim]` and `head` `[vocab, dim]`, chunked
    like `chunked_reverse_kl` (differentiable, checkpointed per chunk)."""
    tokens = tokens.to(hidden.device).long()
    return _over_chunks(_chunk_token_logp, hidden, head, (tokens,), (), kept, chunk)


def sampled_kl_loss(logp: Tensor, old_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """Per-token loss `[N]` of the sampled mode: −(π_θ/π_old)·A with A = −(log π_old − log π_T)
    detached. Its value at π_θ = π_old is the sampled reverse-KL estimate, and its gradient the
    score-function gradient of the reverse KL's single-sample estimator."""
    advantage = -(old_logp - teacher_logp).detach()
    ratio = torch.exp(logp - old_logp.detach())
    return -ratio * advantage
