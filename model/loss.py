"""The pre-training objective: next-token CE + λ·MTP CE (token t+2) + balance + indexer KL.

The weights live here as a dataclass so the trainer can change them by phase (MTP λ 0.3 → 0.1
at the start of LR decay, spec §10.3); the model returns the terms unweighted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .transformer import ModelOutput

IGNORE = -100


@dataclass
class LossWeights:
    mtp: float = 0.3
    balance: float = 1e-4
    indexer: float = 1.0


@dataclass
class LossTerms:
    total: torch.Tensor
    lm: torch.Tensor
    mtp: torch.Tensor
    balance: torch.Tensor
    indexer: torch.Tensor


def next_token_labels(input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """labels[t] = input_ids[t+1] when t+1 is in the same document, else IGNORE."""
    labels = torch.full_like(input_ids, IGNORE)
    labels[:, :-1] = input_ids[:, 1:]
    if doc_ids is not None:
        labels[:, :-1].masked_fill_(doc_ids[:, 1:] != doc_ids[:, :-1], IGNORE)
    return labels


def shift_labels(labels: torch.Tensor, doc_ids: torch.Tensor | None, depth: int) -> torch.Tensor:
    """MTP depth k predicts the token k+1 ahead: labels shifted left by k, never across documents."""
    out = torch.full_like(labels, IGNORE)
    out[:, :-depth] = labels[:, depth:]
    if doc_ids is not None:
        out[:, :-depth].masked_fill_(doc_ids[:, depth:] != doc_ids[:, :-depth], IGNORE)
    return out


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token CE in fp32 over non-ignored labels (0 if none)."""
    flat = labels.reshape(-1)
    if not (flat != IGNORE).any():
        return logits.new_zeros((), dtype=torch.float32) + 0.0 * logits.sum()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), flat, ignore_index=IGNORE)


def token_sums(out: ModelOutput, labels: torch.Tensor, doc_ids: torch.Tensor | None = None,
               weights: LossWeights = LossWeights(), cp=None) -> LossTerms:
    """The same objective as `compute_loss`, as sums over the rows' N target tokens:
    Σ CE + λ·(1/D)·Σ_k (N/N_k)·Σ MTP-k CE + N·(balance + indexer), every term a token mean times N
    (the trainer divides by the global target count, so micro-batches and ranks weigh tokens,
    not batches).

    `labels` and `doc_ids` are whole rows. Under context parallelism (`cp`, a
    `model.context_parallel.ContextParallel`) the logits are this rank's tokens and the
    auxiliary losses its shares: the CE sums run over its own tokens while N and N_k count the
    whole rows, so the group's results add up to the whole rows' objective."""
    take = (lambda t: t) if cp is None else cp.take
    n = (labels != IGNORE).sum().float()
    lm = ce_sum(out.logits, take(labels))
    mtp = torch.zeros((), dtype=torch.float32, device=lm.device)
    for k, mtp_logits in enumerate(out.mtp_logits, start=1):
        shifted = shift_labels(labels, doc_ids, k)
        n_k = (shifted != IGNORE).sum().clamp(min=1).float()
        mtp = mtp + ce_sum(mtp_logits, take(shifted)) * (n / n_k)
    if out.mtp_logits:
        mtp = mtp / len(out.mtp_logits)
    balance, indexer = out.balance_loss * n, out.indexer_loss * n
    total = lm + weights.mtp * mtp + weights.balance * balance + weights.indexer * indexer
    return LossTerms(total, lm.detach(), mtp.detach(), balance.detach(), indexer.detach())


def ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token CE summed in fp32 over non-ignored labels (0, with a graph, if none)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


def compute_loss(out: ModelOutput, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                 doc_ids: torch.Tensor | None = None,
                 weights: LossWeights = LossWeights()) -> LossTerms:
    if labels is None:
        labels = next_token_labels(input_ids, doc_ids)
    lm = cross_entropy(out.logits, labels)
    mtp = torch.zeros((), dtype=torch.float32, device=lm.device)
    for k, mtp_logits in enumerate(out.mtp_logits, start=1):
        mtp = mtp + cross_entropy(mtp_logits, shift_labels(labels, doc_ids, k))
    if out.mtp_logits:
        mtp = mtp / len(out.mtp_logits)
    total = (lm + weights.mtp * mtp + weights.balance * out.balance_loss
             + weights.indexer * out.indexer_loss)
    return LossTerms(total, lm.detach(), mtp.detach(), out.balance_loss.detach(),
                     out.indexer_loss.detach())
