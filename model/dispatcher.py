"""Token dispatch for the MoE: moving token copies to the experts that process them and back.

The MoE does not reorder tokens itself; it hands its routed tokens to a `TokenDispatcher`
object held in `MoE.dispatcher`. That seam is where expert parallelism plugs in: with EP = 1
(`LocalDispatcher`) dispatch is a local sort by expert id; `AllToAllDispatcher` sends
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

import time
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

    #: True when dispatch/combine are collectives: every rank of the group must then run every
    #: MoE forward, also with no tokens of its own (see `any_active`).
    collective: bool = False

    def any_active(self, flag: bool, device: torch.device | str | None = None) -> bool:
        """Whether `flag` is true on any rank whose forwards are joined to this one's by the
        dispatch collectives. A loop whose ranks may finish at different times (generation)
        asks this once per step and keeps running forwards, empty or dummy ones included,
        until no rank has work left; otherwise a rank that leaves early strands the others in
        its all-to-all. Local dispatch joins no one: the flag itself, no communication.
        `device`: where a collective's buffer must live (the model's device; NCCL needs CUDA)."""
        return bool(flag)


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


# ---------------------------------------------------------------------------------- expert parallel
class _AllToAll(torch.autograd.Function):
    """Uneven `all_to_all_single` of several tensors with the same row splits, differentiable.

    One autograd node for all tensors on purpose: its backward runs on a rank as soon as *any*
    output takes part in the loss, so every rank enters the backward collectives together even
    when some outputs are empty or unused there (a rank whose experts got no tokens). Separate
    nodes per tensor could be skipped on one rank and hang the others.
    """

    @staticmethod
    def forward(ctx, send_splits: list[int], recv_splits: list[int], group, *tensors: Tensor):
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        return tuple(_all_to_all(t, send_splits, recv_splits, group) for t in tensors)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        back = tuple(_all_to_all(g.contiguous(), ctx.recv_splits, ctx.send_splits, ctx.group)
                     for g in grads)
        return (None, None, None, *back)


def _all_to_all(t: Tensor, send_splits: list[int], recv_splits: list[int], group) -> Tensor:
    """Rows [sum(send_splits), ...] -> rows [sum(recv_splits), ...]; chunk i goes to rank i."""
    import torch.distributed as dist

    out = t.new_empty((sum(recv_splits), *t.shape[1:]))
    dist.all_to_all_single(out, t.contiguous(), recv_splits, send_splits, group=group)
    return out


@dataclass
class AllToAllHandle(DispatchHandle):
    """`DispatchHandle` plus the exchange layout: `order`/`inverse` sort this rank's copies by
    global expert (= by destination rank); `regroup` sorts the received rows by local expert."""

    send_splits: list[int] | None = None   # [ep] copies sent to each rank
    recv_splits: list[int] | None = None   # [ep] copies received from each rank
    regroup: Tensor | None = None          # [N] received row for each local-expert-sorted row
    regroup_inverse: Tensor | None = None  # [N]


@dataclass
class DispatchStats:
    """Accumulated by the all-to-all dispatcher; read and reset by the trainer per step."""

    bytes_sent: int = 0          # payload bytes this rank sent (dispatch + combine, fwd only)
    dispatch_seconds: float = 0.0
    combine_seconds: float = 0.0
    calls: int = 0


class AllToAllDispatcher(TokenDispatcher):
    """EP > 1: each rank owns experts [ep_rank*E_local, (ep_rank+1)*E_local) of every MoE layer.

    dispatch: sort this rank's T*k copies by global expert (contiguous per destination rank),
    exchange per-expert counts (`all_to_all_single` of [ep, E_local] counts), then the rows and
    their routing weights (uneven `all_to_all_single`), and regroup the received rows by local
    expert (they arrive grouped by source rank). combine runs the exact inverse. The one host
    sync is the count exchange (split sizes must be known on the host); token order inside each
    expert is (source rank, token), so results equal EP = 1 up to summation order.

    `group` is the expert-parallel process group (ranks holding *different* experts); every rank
    of it must call dispatch/combine for every MoE layer, also when it routes no token anywhere.
    """

    collective = True

    def __init__(self, n_experts: int, ep_rank: int, ep_size: int, group=None):
        if ep_size < 1 or n_experts % ep_size:
            raise ValueError(f"ep_size={ep_size}: must divide n_experts={n_experts}")
        if not 0 <= ep_rank < ep_size:
            raise ValueError(f"ep_rank={ep_rank}: must be in [0, {ep_size})")
        self.n_experts, self.ep_rank, self.ep_size, self.group = n_experts, ep_rank, ep_size, group
        self.n_local_experts = n_experts // ep_size
        self.stats = DispatchStats()

    def dispatch(self, x_flat: Tensor, expert_ids: Tensor,
                 weights: Tensor) -> tuple[Tensor, Tensor, AllToAllHandle]:
        import torch.distributed as dist

        t0 = time.perf_counter()
        n_tokens, topk = expert_ids.shape
        ep, e_loc = self.ep_size, self.n_local_experts
        flat_ids = expert_ids.reshape(-1).long()                         # [T*k]
        order = torch.argsort(flat_ids, stable=True)                     # [T*k] by dest rank
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        counts = flat_ids.new_zeros(self.n_experts).scatter_add_(
            0, flat_ids, torch.ones_like(flat_ids))                      # [E]
        recv_counts = torch.empty_like(counts)                           # [ep * E_local]
        dist.all_to_all_single(recv_counts, counts, group=self.group)    # row s: from rank s
        recv_counts = recv_counts.view(ep, e_loc)                        # [ep, E_local]
        send_splits = counts.view(ep, e_loc).sum(1).tolist()             # host sync
        recv_splits = recv_counts.sum(1).tolist()
        x_send = x_flat.index_select(0, order // topk)                   # [T*k, dim]
        w_send = weights.reshape(-1).float().index_select(0, order)      # [T*k]
        x_recv, w_recv = _AllToAll.apply(send_splits, recv_splits, self.group, x_send, w_send)
        # received rows: source-rank blocks, each sorted by local expert -> sort by local expert
        local_eid = torch.repeat_interleave(
            torch.arange(e_loc, device=x_flat.device).repeat(ep), recv_counts.reshape(-1),
            output_size=x_recv.shape[0])                                 # [N]
        regroup = torch.argsort(local_eid, stable=True)                  # [N]
        regroup_inverse = torch.empty_like(regroup)
        regroup_inverse[regroup] = torch.arange(regroup.numel(), device=regroup.device)
        x_local = x_recv.index_select(0, regroup)                        # [N, dim]
        handle = AllToAllHandle(weights=w_recv.index_select(0, regroup), order=order,
                                inverse=inverse, n_tokens=n_tokens, topk=topk,
                                send_splits=send_splits, recv_splits=recv_splits,
                                regroup=regroup, regroup_inverse=regroup_inverse)
        self.stats.bytes_sent += (x_send.numel() * x_send.element_size()
                                  + w_send.numel() * 4 + counts.numel() * 8)
        self.stats.dispatch_seconds += time.perf_counter() - t0
        self.stats.calls += 1
        return x_local, recv_counts.sum(0), handle

    def any_active(self, flag: bool, device: torch.device | str | None = None) -> bool:
        """One MAX all-reduce of a single int over the EP group (a host sync, once per call)."""
        import torch.distributed as dist

        t = torch.tensor([int(bool(flag))], dtype=torch.int32, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())

    def combine(self, expert_out: Tensor, handle: DispatchHandle,
                weighted: bool = False) -> Tensor:
        if not isinstance(handle, AllToAllHandle):
            raise TypeError("AllToAllDispatcher.combine needs the handle its dispatch returned")
        t0 = time.perf_counter()
        y = expert_out
        if weighted:
            y = (y.float() * handle.weights[:, None]).to(expert_out.dtype)
        y_recv = y.index_select(0, handle.regroup_inverse)               # [N, dim] by source
        (y_back,) = _AllToAll.apply(handle.recv_splits, handle.send_splits, self.group, y_recv)
        out = y_back.float().index_select(0, handle.inverse)             # [T*k, dim] token order
        self.stats.bytes_sent += y_recv.numel() * y_recv.element_size()
        self.stats.combine_seconds += time.perf_counter() - t0
        return out.view(handle.n_tokens, handle.topk, -1).sum(dim=1)     # [T, dim]


def deepep_available() -> bool:
    """Whether a DeepEP-backed dispatcher could be used (GPU, `deep_ep` installed). Not
    implemented yet: it would subclass `TokenDispatcher` with the same contract, so the MoE and
    `Experts` stay unchanged."""
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("deep_ep") is not None
