"""Token dispatch for the MoE: moving token copies to the experts that process them and back.

The MoE does not reorder tokens itself; it hands its routed tokens to a `TokenDispatcher`
object held in `MoE.dispatcher`. That seam is where expert parallelism plugs in: with EP = 1
(`LocalDispatcher`) dispatch is a local sort by expert id; a later all-to-all dispatcher sends
each token copy to the rank that owns its expert and returns tokens sorted by *local* expert, and
the `Experts` module (which then holds only `E_local` experts) computes on whatever it receives.

Where the routing weight is applied. DeepSeek-V4 multiplies the routing weight into the SwiGLU
activation h *before* the down projection w2 (spec §5.3; it matters once activations are
quantised). So the weights travel with the tokens: `dispatch` puts them, in the same order as the
dispatched tokens, into `handle.weights`, the experts apply them, and `combine` then only sums
the k returned copies of each token (`weighted=False`, the MoE's call). `combine(...,
weighted=True)` applies the weights there instead, for expert code that does not apply them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class DispatchHandle:
    """What `combine` needs to undo a `dispatch`; opaque to the MoE except for `weights`."""

    weights: Tensor      # [N] fp32 routing weight of each dispatched copy, in dispatched order
    order: Tensor        # [T*k] int64: dispatched position i holds flat (token, slot) order[i]
    inverse: Tensor      # [T*k] int64: flat (token, slot) j sits at dispatched position inverse[j]
    n_tokens: int        # T
    topk: int            # k


class TokenDispatcher(ABC):
    """Moves token copies to their experts (`dispatch`) and expert outputs back (`combine`).

    Contract every implementation keeps, so `Experts` and `MoE` never change with the
    parallelism:
    - `dispatch(x_flat [T, dim], expert_ids [T, k], weights [T, k])` returns the token copies
      this rank must process, grouped contiguously by local expert in ascending order
      (`[N, dim]`), the number of copies per local expert (`[n_local_experts]` int64, summing
      to N), and a handle whose `weights` ([N] fp32) are the routing weights in that order;
    - `combine(expert_out [N, dim], handle)` returns `[T, dim]` in fp32, each token's k expert
      outputs summed (times their routing weights only when `weighted=True`).
    """

    n_local_experts: int

    @abstractmethod
    def dispatch(self, x_flat: Tensor, expert_ids: Tensor,
                 weights: Tensor) -> tuple[Tensor, Tensor, DispatchHandle]:
        ...

    @abstractmethod
    def combine(self, expert_out: Tensor, handle: DispatchHandle,
                weighted: bool = False) -> Tensor:
        ...


class LocalDispatcher(TokenDispatcher):
    """EP = 1: every expert is local, so dispatch is a stable sort of the T*k copies by expert.

    The sort is stable so copies of one expert keep token order, which makes results
    reproducible and equal to a per-token loop up to summation order. Combine gathers with the
    inverse permutation and sums over the k copies (no atomic scatter-add in the forward), so
    its result does not depend on thread scheduling on GPU.
    """

    def __init__(self, n_experts: int):
        if n_experts <= 0:
            raise ValueError(f"n_experts={n_experts}: must be a positive integer")
        self.n_local_experts = n_experts

    def dispatch(self, x_flat: Tensor, expert_ids: Tensor,
                 weights: Tensor) -> tuple[Tensor, Tensor, DispatchHandle]:
        if x_flat.dim() != 2:
            raise ValueError(f"x_flat: expected [tokens, dim], got shape {tuple(x_flat.shape)}")
        n_tokens = x_flat.shape[0]
        if expert_ids.dim() != 2 or expert_ids.shape[0] != n_tokens:
            raise ValueError(f"expert_ids: expected [{n_tokens}, k], got shape "
                             f"{tuple(expert_ids.shape)}")
        if weights.shape != expert_ids.shape:
            raise ValueError(f"weights: expected shape {tuple(expert_ids.shape)} like expert_ids, "
                             f"got {tuple(weights.shape)}")
        topk = expert_ids.shape[1]
        flat_ids = expert_ids.reshape(-1).long()                         # [T*k]
        order = torch.argsort(flat_ids, stable=True)                     # [T*k]
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        # scatter_add rather than bincount: bincount must read max(id) on the host (a GPU sync)
        counts = flat_ids.new_zeros(self.n_local_experts).scatter_add_(
            0, flat_ids, torch.ones_like(flat_ids))                      # [E] int64
        x_sorted = x_flat.index_select(0, order // topk)                 # [T*k, dim]
        w_sorted = weights.reshape(-1).float().index_select(0, order)    # [T*k]
        handle = DispatchHandle(weights=w_sorted, order=order, inverse=inverse,
                                n_tokens=n_tokens, topk=topk)
        return x_sorted, counts, handle

    def combine(self, expert_out: Tensor, handle: DispatchHandle,
                weighted: bool = False) -> Tensor:
        n = handle.n_tokens * handle.topk
        if expert_out.dim() != 2 or expert_out.shape[0] != n:
            raise ValueError(f"expert_out: expected [{n}, dim], got shape "
                             f"{tuple(expert_out.shape)}")
        out = expert_out.float()                                         # [T*k, dim]
        if weighted:
            out = out * handle.weights[:, None]
        out = out.index_select(0, handle.inverse)                        # [T*k, dim] token order
        return out.view(handle.n_tokens, handle.topk, -1).sum(dim=1)     # [T, dim]
