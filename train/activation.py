"""Activation checkpointing levels.

- `off`: keep every activation;
- `block`: recompute each transformer block in backward (keeps only the hc residual streams
  between blocks: the biggest saving, ~1 extra forward);
- `selective`: recompute the attention and MoE sublayers only, keeping the cheap-to-store,
  expensive-to-recompute mHC mixing and norms (DeepSeek-V4 recomputes selectively too).
"""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint

LEVELS = ("off", "block", "selective")


def _wrap(module: nn.Module) -> None:
    forward = module.forward

    @functools.wraps(forward)
    def checkpointed(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    module.forward = checkpointed


def apply_activation_checkpointing(model: nn.Module, level: str) -> None:
    if level not in LEVELS:
        raise ValueError(f"activation_checkpointing={level!r}: choose one of {LEVELS}")
    if level == "off":
        return
    for block in [*model.layers, *model.mtp]:
        if level == "block":
            _wrap(block)
        else:
            _wrap(block.attn)
            _wrap(block.ffn)
