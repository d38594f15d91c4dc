"""Whole-matrix ownership for data-parallel Muon (the ZeRO-1-like split of Muon's work).

Under data parallelism every rank holds the same parameters and, after the gradient all-reduce,
the same gradients. Running Newton-Schulz for every matrix on every rank would repeat the most
expensive part of the step world_size times. Instead (Moonlight, DeepSeek-V4, Keller Jordan's
distributed Muon) each Muon parameter is *owned* by one rank: only the owner keeps its momentum,
orthogonalises it and applies the update; then the owner broadcasts the new values. Matrices are
never cut, so NS always sees the full (fully reduced) matrix: the bug class where a partition
boundary fed NS half-reduced slices cannot happen here.

Assignment: longest-processing-time-first (greedy knapsack) on the NS cost of each tensor, so
ranks get similar work; DeepSeek-V4 uses a knapsack over whole matrices as well. The plan depends
only on the shapes and their order, so every rank computes the same plan without talking.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from typing import Sequence

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .muon import block_shape


def resolve_group(process_group):
    """None → the default group when torch.distributed runs with >1 rank; else no distribution."""
    if process_group is None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist.group.WORLD
        return None
    return process_group


def group_rank_size(group) -> tuple[int, int]:
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def ns_cost(shape: Sequence[int], row_blocks: int = 1) -> float:
    """FLOPs-proportional cost of one NS iteration on the tensor: B · (4·s²·l + 2·s³)."""
    b, r, c = block_shape(shape, row_blocks)
    s, l = min(r, c), max(r, c)
    return float(b) * (4.0 * s * s * l + 2.0 * s ** 3)


def assign_owners(costs: Sequence[float], world_size: int) -> list[int]:
    """Owner rank per item: biggest first, each to the currently least-loaded rank (ties → lowest
    rank). Deterministic, so all ranks agree."""
    owners = [0] * len(costs)
    if world_size <= 1:
        return owners
    heap = [(0.0, r) for r in range(world_size)]
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    for i in order:
        load, r = heapq.heappop(heap)
        owners[i] = r
        heapq.heappush(heap, (load + costs[i], r))
    return owners


def broadcast_from_owners(tensors: Sequence[torch.Tensor], owners: Sequence[int], group,
                          bucket_numel: int = 1 << 26) -> None:
    """Every rank ends with the owner's values of each tensor (in place).

    Tensors of one owner, device and dtype are flattened into buckets of ≤ `bucket_numel`
    elements, so there are few collectives and the extra memory is one bucket at a time.
    """
    if group is None:
        return
    me, world = group_rank_size(group)
    buckets: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for t, owner in zip(tensors, owners):
        buckets[(owner, t.device.type, t.dtype)].append(t)
    # iterate in a rank-independent order so the collectives line up
    for (owner, _, _), ts in sorted(buckets.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                      str(kv[0][2]))):
        src = dist.get_global_rank(group, owner) if group is not dist.group.WORLD else owner
        for chunk in chunk_by_size(ts, torch.Tensor.numel, bucket_numel):
            flat = _flatten_dense_tensors([t.detach() for t in chunk])
            dist.broadcast(flat, src=src, group=group)
            if me != owner:
                for t, v in zip(chunk, _unflatten_dense_tensors(flat, chunk)):
                    t.copy_(v)


def chunk_by_size(items: Sequence, size_of, cap: int):
    """Consecutive runs of `items` whose sizes sum to at most `cap` (an item larger than `cap`
    is a run of its own)."""
    chunk: list = []
    n = 0
    for item in items:
        k = size_of(item)
        if chunk and n + k > cap:
            yield chunk
            chunk, n = [], 0
        chunk.append(item)
        n += k
    if chunk:
        yield chunk


def reduce_to_owners(grads: Sequence[torch.Tensor], owners: Sequence[int], group,
                     divisor: float, bucket_numel: int = 1 << 26) -> dict[int, torch.Tensor]:
    """Sums each gradient over `group` onto its owner, in fp32, divided by `divisor`.

    Returns {position in `grads`: fp32 sum / divisor} for the tensors this rank owns (all of them
    when `group` is None: a local domain). Buckets as `broadcast_from_owners`: one `reduce` per
    owner and ≤ `bucket_numel` elements, in a rank-independent order; fp32 on the wire, so the
    owner's sum is the same as an fp32 all-reduce's (no bf16 rounding of partial sums).
    """
    me, _ = group_rank_size(group)
    out: dict[int, torch.Tensor] = {}
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, (g, owner) in enumerate(zip(grads, owners)):
        buckets[(owner, g.device.type)].append(i)
    for (owner, _), idx in sorted(buckets.items()):
        src = owner if group in (None, dist.group.WORLD) else dist.get_global_rank(group, owner)
        for chunk in chunk_by_size(idx, lambda i: grads[i].numel(), bucket_numel):
            flat = torch.cat([grads[i].detach().reshape(-1).float() for i in chunk])
            if group is not None:
                dist.reduce(flat, dst=src, group=group)
            if me != owner:
                continue
            flat.div_(divisor)
            offset = 0
            for i in chunk:
                n = grads[i].numel()
                out[i] = flat[offset:offset + n].view(grads[i].shape)
                offset += n
    return out
