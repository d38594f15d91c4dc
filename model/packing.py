"""Packed-sequence helpers: several documents share one row, separated by `doc_ids`."""

from __future__ import annotations

import torch


def positions_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """0-based position inside each document: `[batch, seq]` (documents are contiguous runs)."""
    batch, seq = doc_ids.shape
    t = torch.arange(seq, device=doc_ids.device).expand(batch, seq)
    new_doc = torch.ones_like(doc_ids, dtype=torch.bool)
    new_doc[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    starts = torch.where(new_doc, t, torch.zeros_like(t)).cummax(dim=1).values
    return t - starts
