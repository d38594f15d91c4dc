"""Muon for one logical matrix (or a batch of them): momentum, orthogonalisation, scaling.

DeepSeek-V4 Algorithm 1, per logically independent matrix W (n × m):

    M ← μ·M + G                     (μ = 0.95, M kept in fp32: the "sum" momentum form)
    U ← G + μ·M                     (Nesterov; U = M without it)
    O ← NS(U) · γ · sqrt(max(n, m)) (γ = 0.18)
    W ← W·(1 − η·λ) − η·O           (decoupled weight decay λ = 0.1, η the AdamW-style lr)

Why γ·sqrt(max(n, m)): a full-rank orthogonal n×m matrix has RMS 1/sqrt(max(n, m)), so the
scaled update has RMS ≈ γ, the RMS of a typical AdamW update. AdamW learning rates and weight
decay then carry over unchanged (Moonlight uses γ = 0.2; `scale_mode="kj"` gives Keller Jordan's
sqrt(max(1, n/m)) instead).

Momentum form: Keller Jordan and torch.optim.Muon keep an EMA, buf = (1−μ)·M. The two forms
differ by a positive factor only, which Newton-Schulz's normalisation removes, so updates agree
(up to the 1e-7 epsilon); saved buffers do not carry over between the two forms.

A "block view" turns a parameter into the batch of logical matrices it holds: stacked experts
[E, n, m] are E matrices; a weight with `row_blocks = k` (e.g. `wo_a`, o_groups maps) of shape
[k·r, c] is k matrices of r × c. Each block gets its own norm and its own scale.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .newton_schulz import ScheduleLike, newton_schulz

SCALE_MODES = ("match_rms", "kj")


def block_shape(shape: Sequence[int], row_blocks: int = 1) -> tuple[int, int, int]:
    """(batch, rows, cols) of the logical matrices inside a tensor of `shape`."""
    if len(shape) < 2:
        raise ValueError(f"Muon needs a matrix, got shape {tuple(shape)}")
    rows, cols = int(shape[-2]), int(shape[-1])
    if rows % row_blocks:
        raise ValueError(f"{rows} rows cannot be split into {row_blocks} blocks")
    batch = math.prod(int(s) for s in shape[:-2]) * row_blocks
    return batch, rows // row_blocks, cols


def block_view(t: torch.Tensor, row_blocks: int = 1) -> torch.Tensor:
    """[..., k·r, c] → [B, r, c]: a view (no copy) for contiguous tensors."""
    b, r, c = block_shape(t.shape, row_blocks)
    return t.reshape(b, r, c)


def update_scale(rows: int, cols: int, scale_mode: str = "match_rms", gamma: float = 0.18) -> float:
    """Multiplier applied to the orthogonalised update of one rows × cols block."""
    if scale_mode == "match_rms":
        return gamma * math.sqrt(max(rows, cols))
    if scale_mode == "kj":
        return math.sqrt(max(1.0, rows / cols))
    raise ValueError(f"unknown Muon scale_mode {scale_mode!r}; choose one of {SCALE_MODES}")


def momentum_direction(grad: torch.Tensor, buf: torch.Tensor, momentum: float,
                       nesterov: bool = True) -> torch.Tensor:
    """Updates the fp32 buffer in place (M ← μM + G) and returns a fresh fp32 NS input."""
    buf.mul_(momentum).add_(grad)
    if nesterov:
        return buf.mul(momentum).add_(grad)
    return buf.clone()


def orthogonalize(inputs: Sequence[torch.Tensor], schedule: ScheduleLike = "hybrid10",
                  dtype: torch.dtype | None = None, eps: float = 1e-7,
                  max_batch_numel: int = 1 << 26) -> list[torch.Tensor]:
    """Newton-Schulz over several [B_i, r, c] tensors of one block shape, batched together.

    Same-shape matrices share one batched call (fewer, larger kernels), in chunks of at most
    `max_batch_numel` elements so the stacked copy stays bounded. Results are per input, in order.
    """
    out: list[torch.Tensor] = []
    chunk: list[torch.Tensor] = []
    numel = 0

    def flush() -> None:
        nonlocal chunk, numel
        if not chunk:
            return
        stacked = chunk[0] if len(chunk) == 1 else torch.cat(chunk, dim=0)
        result = newton_schulz(stacked, schedule, dtype=dtype, eps=eps)
        out.extend(result.split([t.shape[0] for t in chunk], dim=0))
        chunk, numel = [], 0

    for t in inputs:
        if chunk and numel + t.numel() > max_batch_numel:
            flush()
        chunk.append(t)
        numel += t.numel()
    flush()
    return out
