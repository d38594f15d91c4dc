"""Partial, interleaved rotary embeddings with YaRN frequency interpolation (spec §4.2).

Only the last `rope_head_dim` channels of a vector rotate, and pairs are (2i, 2i+1) (GPT-J /
complex convention), which is what the released checkpoints were trained with. SWA layers use
`rope_theta` without YaRN; compressed (CSA/HCA) layers use `compress_rope_theta` with YaRN
(frequency interpolation only: no mscale on the softmax), as the released config hard-wires;
`original_seq_len: 0` or `rope_factor: 1` turn YaRN off, as in the reference inference code.
"""

from __future__ import annotations

import math

import torch

from .config import ModelConfig


def rope_frequencies(cfg: ModelConfig, compressed: bool) -> torch.Tensor:
    """Per-pair angular frequencies, fp32 `[rope_head_dim // 2]`."""
    rd = cfg.rope_head_dim
    theta = cfg.compress_rope_theta if compressed else cfg.rope_theta
    freqs = 1.0 / theta ** (torch.arange(0, rd, 2, dtype=torch.float64) / rd)
    # YaRN only where the reference applies it: compressed layers with original_seq_len > 0
    # (0 disables it there, like a factor of 1)
    if compressed and cfg.rope_factor > 1 and cfg.original_seq_len > 0:
        def correction(beta: float) -> float:
            return rd * math.log(cfg.original_seq_len / (2 * math.pi * beta)) / (2 * math.log(theta))

        low = max(math.floor(correction(cfg.beta_fast)), 0)
        high = min(math.ceil(correction(cfg.beta_slow)), rd - 1)
        if high == low:
            high += 1e-3  # avoid a zero-width ramp
        ramp = ((torch.arange(rd // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        freqs = freqs * (1 - ramp) + freqs / cfg.rope_factor * ramp
    return freqs.float()


def apply_rope(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor,
               inverse: bool = False) -> torch.Tensor:
    """Rotates the last `2 * len(freqs)` channels of `x` by `positions`.

    x: `[batch, seq, ..., dim]`; positions: `[batch, seq]`. `inverse=True` de-rotates, which the
    attention output uses so that each value's contribution depends on relative distance only.
    """
    rd = 2 * freqs.numel()
    angles = positions.to(torch.float32)[..., None] * freqs.to(x.device)  # [batch, seq, rd/2]
    while angles.dim() < x.dim():  # broadcast over head dims between seq and channels
        angles = angles.unsqueeze(-2)
    cos, sin = angles.cos(), angles.sin()
    if inverse:
        sin = -sin
    nope, rope = x[..., :-rd], x[..., -rd:].float()
    pairs = rope.unflatten(-1, (rd // 2, 2))  # [..., rd/2, 2]
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
    return torch.cat((nope, rotated.to(x.dtype)), dim=-1)
