"""RMSNorm, computed in fp32 and cast back: every V4 norm (q/kv latents, compressor, block, final)."""

from __future__ import annotations

import functools

import torch
from torch import nn

import v4kernels


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Weightless RMS normalisation in fp32 (per-head query norm, mHC input norm)."""
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return v4kernels.rms_norm(x, self.weight, self.eps)  # Triton on GPU, else the reference


def fp32_island(x: torch.Tensor):
    """Context in which matmuls really run in fp32 even under autocast (router, compressor,
    mHC, indexer scores): autocast would otherwise silently run `x.float() @ w.float()` in bf16."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def fp32_region(fn):
    """Decorator form of `fp32_island`, keyed on the first tensor argument's device."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if t is None or not torch.is_autocast_enabled(t.device.type):
            return fn(*args, **kwargs)
        with fp32_island(t):
            return fn(*args, **kwargs)

    return wrapper
