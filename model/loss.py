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
