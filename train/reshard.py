"""Resuming at another layout: world size, `parallel.ep_size` or `parallel.zero_stage`.

Why this is short: nothing in a checkpoint is a flat slice. The weights (`model/`) are saved
whole, with full `[n_routed_experts, ...]` stacks. Optimizer state is per parameter and whole
(whole-matrix ownership, `optim.distributed`): each `optimizer_rank{r}.pt` holds complete
tensors for the matrices rank r owned (Muon momentum, AdamW moments, fp32 masters at stages 1
and 2) and, at stage 0, the replicated AdamW state. Under EP a rank's expert state is its
slice of each stack, `[E / ep, ...]`, the same for every rank of its expert-data-parallel group.
So resharding is bookkeeping: find each parameter's state by name in the saved files, rebuild
full expert stacks from the saved EP ranks' slices, cut this rank's slice for the new EP, and
hand `MuonAdamW.load_state_dict` a consolidated state, from which it keeps what this rank owns
in the new layout.

Memory: the saved files are opened with `mmap=True`, so a rank only reads the tensors it
takes (each rank maps every file, but pages in about its own share).

What carries over exactly: weights, Muon momentum, AdamW moments and step counts, fp32 masters
between sharded stages (1 and 2), the scheduler, the data position (a global cursor: the next
global batch is the same at any world size) and the counters. What cannot: from a sharded
stage to stage 0 with bf16, DeepSpeed's fp32 masters restart from the saved bf16 weights (its
wrapper owns them); and per-rank RNG streams, which are re-derived from the saved ones and the
new rank (nothing in pre-training draws random numbers after initialisation).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from . import expert_parallel as ep


def describe(saved: tuple[int, int, int], now: tuple[int, int, int]) -> str:
    """"world size 2 -> 4, parallel.ep_size 2 -> 1" for the (world, ep_size, zero_stage) that
    differ; "" when the layout is the same."""
    names = ("world size", "parallel.ep_size", "parallel.zero_stage")
    return ", ".join(f"{n} {a} -> {b}" for n, a, b in zip(names, saved, now) if a != b)


def _names(sd: dict[str, Any]) -> dict[int, str]:
    """State index → parameter name, from the saved parameter groups."""
    out = {}
    for g in sd["param_groups"]:
        for idx, name in zip(g["params"], g["param_names"]):
            out[int(idx)] = name
    return out


def saved_states(path: Path, saved_world: int, saved_ep: int) -> dict[str, dict[int, dict]]:
    """name → {saved EP rank: state entry} over every rank's optimizer file (memory-mapped; the
    first file holding an entry wins: replicas within an expert-data-parallel group, or of the
    replicated AdamW state, are equal)."""
    found: dict[str, dict[int, dict]] = defaultdict(dict)
    for r in range(saved_world):
        file = path / f"optimizer_rank{r}.pt"
        sd = torch.load(file, map_location="cpu", mmap=True, weights_only=False)
        names = _names(sd)
        for idx, entry in sd["state"].items():
            if entry:
                found[names[int(idx)]].setdefault(r % saved_ep, entry)
    return found


def _expert_entry(pieces: dict[int, dict], saved_ep: int, ep_rank: int, ep_size: int) -> dict:
    """Full stacks from the saved EP ranks' slices, then this rank's slice at `ep_size`."""
    out = {}
    for key, first in pieces[0].items():
        if torch.is_tensor(first) and first.dim() > 0:
            full = torch.cat([pieces[e][key] for e in range(saved_ep)])
            n = full.shape[0] // ep_size
            out[key] = full[ep_rank * n:(ep_rank + 1) * n]
        else:
            out[key] = first   # AdamW's step counter: the same for every slice
    return out


def resharded_state_dict(optimizer, path: Path, saved_world: int, saved_ep: int,
                         ep_rank: int, ep_size: int) -> dict[str, Any]:
    """A consolidated state dict in `optimizer`'s own layout (its groups and indices) built
    from a checkpoint written at another layout."""
    found = saved_states(path, saved_world, saved_ep)
    state, groups, idx = {}, [], 0
    for group in optimizer.param_groups:
        saved = {k: v for k, v in group.items() if k not in ("params", "shard_group")}
        saved["params"] = list(range(idx, idx + len(group["params"])))
        groups.append(saved)
        for name in group["param_names"]:
            pieces = found.get(name)
            if pieces:
                if ep.is_expert_param(name):
                    entry = (_expert_entry(pieces, saved_ep, ep_rank, ep_size)
                             if len(pieces) == saved_ep else None)
                else:
                    entry = dict(pieces[min(pieces)])
                if entry is not None and not getattr(optimizer, "sharded", False):
                    entry.pop("master", None)  # stage 0: the bf16 weights are the reference
                if entry:
                    state[idx] = entry
            idx += 1
    return {"state": state, "param_groups": groups}


def reseed(rank: int, step: int) -> None:
    """Distinct, reproducible RNG streams for the new ranks (after the saved rank's were set)."""
    import random

    import numpy as np

    seed = (torch.initial_seed() * 1_000_003 + rank * 7919 + step) % (2 ** 63)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
