"""`MuonAdamW`: one torch optimizer that steps the Muon groups and the AdamW groups.

Why one object: the trainer, LR schedulers (which set `param_groups[i]['lr']`), checkpointing and
DeepSpeed (as a client optimizer) all expect a single `torch.optim.Optimizer`.

Groups carry `use_muon`. Muon groups also carry `row_blocks` (logical row blocks per parameter),
`param_names` and `shapes` (the logical shapes at construction). `shapes` guards against
wrappers that swap in flattened or partitioned tensors (DeepSpeed ZeRO ≥ 1 does): Muon on a flat
shard is silently wrong, so `step` raises instead.

Distributed (data parallel): pass `process_group` (None → the default group when
torch.distributed runs with several ranks). Each Muon tensor is owned by one rank
(`optim.distributed`): only the owner keeps momentum, runs Newton-Schulz and applies the update,
then owners broadcast the new values. Gradients must already be averaged across ranks (DDP, or
DeepSpeed stage 0, does that). AdamW state is small next to Muon's and is replicated.

Call `step` once per optimizer step, after gradient accumulation: Newton-Schulz then runs once
per matrix per step (`ns_matrices` counts it), never per micro-batch.

Checkpoints (`optim.checkpoint`): `state_dict` is consolidated (a collective; restores at any
world size), `sharded_state_dict` is per rank (same world size only). `skip_next_step` makes the
next `step` a no-op, for non-finite losses.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Callable, Iterable

import torch

from . import checkpoint
from .adamw import adamw_init, adamw_step
from .distributed import assign_owners, broadcast_from_owners, group_rank_size, ns_cost, \
    resolve_group
from .groups import logical_shape
from .muon import SCALE_MODES, block_shape, block_view, momentum_direction, orthogonalize, \
    update_scale
from .newton_schulz import default_ns_dtype, get_schedule

log = logging.getLogger("v4lab.optim")

_FLATTENED = ("was replaced by a tensor of another shape; a wrapper probably flattened or "
              "partitioned the parameters (DeepSpeed ZeRO stage >= 1 does). Muon needs whole "
              "matrices: use ZeRO stage 0 (see optim.check_zero_stage)")


class MuonAdamW(torch.optim.Optimizer):
    """Muon (hybrid Newton-Schulz) for `use_muon=True` groups, AdamW for the others."""

    def __init__(self, params: Iterable[dict[str, Any]], lr: float = 2.7e-4,
                 weight_decay: float = 0.1, momentum: float = 0.95, nesterov: bool = True,
                 ns_coefficients: Any = "hybrid10", ns_dtype: torch.dtype | None = None,
                 ns_eps: float = 1e-7, scale_mode: str = "match_rms", gamma: float = 0.18,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-20,
                 process_group: Any = None, bucket_numel: int = 1 << 26,
                 max_ns_batch_numel: int = 1 << 26) -> None:
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1:
            raise ValueError(f"invalid lr={lr}, weight_decay={weight_decay} or momentum={momentum}")
        if scale_mode not in SCALE_MODES:
            raise ValueError(f"unknown scale_mode {scale_mode!r}; choose one of {SCALE_MODES}")
        get_schedule(ns_coefficients)  # fail early on a bad schedule name
        self._muon_defaults = dict(momentum=momentum, nesterov=nesterov,
                                   ns_coefficients=ns_coefficients, ns_dtype=ns_dtype,
                                   ns_eps=ns_eps, scale_mode=scale_mode, gamma=gamma)
        self._adamw_defaults = dict(betas=tuple(betas), eps=eps)
        self._process_group_arg = process_group
        self._process_group_resolved = False
        self.bucket_numel = int(bucket_numel)
        self.max_ns_batch_numel = int(max_ns_batch_numel)
        self.ns_calls = 0      # newton_schulz invocations on this rank
        self.ns_matrices = 0   # logical matrices orthogonalised on this rank
        self._stepped = False  # see `_is_state_init_step`
        self._skip_next = False
        self._plan_key: Any = None
        self._owners: list[int] = []
        super().__init__(list(params), dict(lr=lr, weight_decay=weight_decay))

    @property
    def process_group(self):
        """The data-parallel group Muon's work is split over (None: not split).

        Resolved on first use, not at construction, so an optimizer built before
        `torch.distributed` is initialised (e.g. before `deepspeed.initialize`) still shards.
        """
        if not self._process_group_resolved:
            self._process_group = resolve_group(self._process_group_arg)
            self._process_group_resolved = True
        return self._process_group

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict) or "use_muon" not in param_group:
            raise ValueError("MuonAdamW needs parameter groups with a 'use_muon' flag; build them "
                             "with optim.param_groups(model)")
        g = dict(param_group)
        params = g["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        g["params"] = params
        g["use_muon"] = bool(g["use_muon"])
        g.setdefault("param_names", [f"{'muon' if g['use_muon'] else 'adamw'}.{len(self.param_groups)}"
                                     f".{i}" for i in range(len(params))])
        if len(g["param_names"]) != len(params):
            raise ValueError("param_names and params differ in length")
        for k, v in (self._muon_defaults if g["use_muon"] else self._adamw_defaults).items():
            g.setdefault(k, v)
        if g["use_muon"]:
            g.setdefault("row_blocks", [1] * len(params))
            if len(g["row_blocks"]) != len(params):
                raise ValueError("row_blocks and params differ in length")
            g["shapes"] = [tuple(logical_shape(p)) for p in params]
            for name, shape, k in zip(g["param_names"], g["shapes"], g["row_blocks"]):
                if len(shape) < 2:
                    raise ValueError(f"Muon parameter {name!r} has shape {shape}; Muon needs "
                                     f"matrices (send it to AdamW)")
                if shape[-2] % k:
                    raise ValueError(f"Muon parameter {name!r} {shape}: {shape[-2]} rows cannot be "
                                     f"split into {k} row blocks")
        super().add_param_group(g)

    def _muon_params(self):
        """(group, index, param, name) for every Muon parameter, in a rank-independent order."""
        for group in self.param_groups:
            if not group["use_muon"]:
                continue
            params = group["params"]
            if len(params) != len(group["shapes"]):
                raise RuntimeError(f"Muon group with {group['param_names'][:3]}... {_FLATTENED}")
            for i, p in enumerate(params):
                if tuple(logical_shape(p)) != tuple(group["shapes"][i]):
                    raise RuntimeError(f"Muon parameter {group['param_names'][i]!r} "
                                       f"{tuple(group['shapes'][i])} {_FLATTENED}")
                yield group, i, p, group["param_names"][i]

    def shard_group_of(self, group: dict[str, Any]):
        """The process group a Muon group's matrices are split over (None: kept local).

        A group may carry `shard_group`: a process group, or "local". Expert parallelism uses it:
        routed-expert stacks differ between ranks of different expert shards, so they are owned
        within their expert-data-parallel group (or locally when that group has one rank), never
        broadcast across ranks that hold other experts. Absent: the optimizer's `process_group`.
        """
        if "shard_group" not in group:
            return self.process_group
        sg = group["shard_group"]
        return None if sg == "local" else sg

    def _domains(self) -> list[tuple[Any, list[int]]]:
        """(process group, indices into `_muon_params`) per shard domain, in first-use order
        (the same on every rank, so per-domain collectives line up)."""
        domains: dict[int, tuple[Any, list[int]]] = {}
        for n, (g, _, _, _) in enumerate(self._muon_params()):
            pg = self.shard_group_of(g)
            domains.setdefault(id(pg), (pg, []))[1].append(n)
        return list(domains.values())

    def owners(self) -> list[int]:
        """Owner rank (in its shard domain's group) of each Muon parameter, in `_muon_params`
        order."""
        items = list(self._muon_params())
        domains = self._domains()
        key = (tuple((group_rank_size(pg)[1], tuple(ix)) for pg, ix in domains),
               tuple((tuple(g["shapes"][i]), g["row_blocks"][i]) for g, i, _, _ in items))
        if key != self._plan_key:
            costs = [ns_cost(g["shapes"][i], g["row_blocks"][i]) for g, i, _, _ in items]
            owners = [0] * len(items)
            for pg, ix in domains:
                me, world = group_rank_size(pg)
                for n, o in zip(ix, assign_owners([costs[n] for n in ix], world)):
                    owners[n] = o
                if world > 1:
                    mine = [costs[n] for n in ix if owners[n] == me]
                    log.info(f"Muon split over {world} ranks: rank {me} owns {len(mine)} of "
                             f"{len(ix)} tensors, {sum(mine) / max(sum(costs[n] for n in ix), 1):.1%}"
                             f" of the Newton-Schulz FLOPs")
            self._owners = owners
            self._plan_key = key
        return self._owners

    def owned_flags(self) -> list[bool]:
        """Whether this rank owns each Muon parameter (in `_muon_params` order)."""
        owners = self.owners()
        flags = [False] * len(owners)
        for pg, ix in self._domains():
            me, _ = group_rank_size(pg)
            for n in ix:
                flags[n] = owners[n] == me
        return flags

    def broadcast_owned(self, tensors_of) -> None:
        """Owners broadcast `tensors_of(index, param)` within each shard domain (in place)."""
        items = list(self._muon_params())
        owners = self.owners()
        for pg, ix in self._domains():
            broadcast_from_owners([tensors_of(n, items[n][2]) for n in ix],
                                  [owners[n] for n in ix], pg, self.bucket_numel)

    def ownership(self) -> dict[str, int]:
        """Muon parameter name → owner rank (for logs and tests)."""
        return {name: o for (_, _, _, name), o in zip(self._muon_params(), self.owners())}

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._skip_next:
            self._skip_next = False
            return loss
        if not self._stepped and self._is_state_init_step():
            self._init_state()
            return loss
        self._stepped = True
        self._muon_step()
        for group in self.param_groups:
            if group["use_muon"]:
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("MuonAdamW does not support sparse gradients")
                adamw_step(p, p.grad, self.state[p], lr=group["lr"], betas=group["betas"],
                           eps=group["eps"], weight_decay=group["weight_decay"])
        return loss

    def skip_next_step(self) -> None:
        """Make the next `step()` a no-op (no update, no state change, no communication).

        For a non-finite loss or gradient norm: the trainer decides on all ranks together, then
        still calls `step()` (DeepSpeed always does at the accumulation boundary)."""
        self._skip_next = True

    def _is_state_init_step(self) -> bool:
        """A first step whose gradients are all exactly zero only creates state.

        DeepSpeed's mixed-precision wrappers (bf16/fp16 at stage 0) call `step()` once with zero
        gradients to allocate optimizer state. Run as a real step it would apply weight decay and
        advance AdamW's bias-correction counter, so training would not match an unwrapped run.
        Checked only until the first real step.
        """
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        return bool(grads) and not any(bool(g.any()) for g in grads)

    def _init_state(self) -> None:
        for (_, _, p, _), mine in zip(self._muon_params(), self.owned_flags()):
            if mine and "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(
                    p, dtype=torch.float32, memory_format=torch.contiguous_format)
        for group in self.param_groups:
            if not group["use_muon"]:
                for p in group["params"]:
                    adamw_init(p, self.state[p])

    def _muon_step(self) -> None:
        """Owned matrices: momentum, batched Newton-Schulz, update; then owners broadcast.

        Work is bucketed by block shape (one batched NS call per bucket) and cut into slices of
        at most `max_ns_batch_numel` elements, cutting stacked experts between experts, so the
        temporary fp32/bf16 copies stay bounded even for [256, 2048, 4096] expert stacks.
        """
        items = list(self._muon_params())
        work: dict[tuple, list] = defaultdict(list)
        for (group, i, p, name), mine in zip(items, self.owned_flags()):
            if not mine or p.grad is None:
                continue
            k = group["row_blocks"][i]
            b, r, c = block_shape(p.shape, k)
            dtype = group["ns_dtype"] or default_ns_dtype(p.device)
            key = (r, c, p.device, dtype, get_schedule(group["ns_coefficients"]), group["ns_eps"])
            per_slice = max(1, self.max_ns_batch_numel // (r * c))
            for s in range(0, b, per_slice):
                work[key].append((group, i, p, name, s, min(b, s + per_slice)))
        for (r, c, _, dtype, sched, eps), entries in work.items():
            for chunk in _numel_chunks(entries, r * c, self.max_ns_batch_numel):
                inputs = [self._direction(g, i, p, s, e) for g, i, p, _, s, e in chunk]
                outs = orthogonalize(inputs, sched, dtype=dtype, eps=eps,
                                     max_batch_numel=self.max_ns_batch_numel)
                self.ns_calls += 1
                self.ns_matrices += sum(u.shape[0] for u in inputs)
                for (g, i, p, name, s, e), o in zip(chunk, outs):
                    w = _blocks(p, g["row_blocks"][i], name)[s:e]      # [e - s, r, c] view
                    w.mul_(1 - g["lr"] * g["weight_decay"])
                    w.add_(o.to(p.dtype), alpha=-g["lr"] * update_scale(r, c, g["scale_mode"],
                                                                          g["gamma"]))
        self.broadcast_owned(lambda n, p: p)

    def _direction(self, group: dict[str, Any], i: int, p: torch.Tensor, s: int,
                   e: int) -> torch.Tensor:
        """Momentum update of blocks [s, e) of `p` (in place) → fresh fp32 NS input [e-s, r, c]."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32,
                                                        memory_format=torch.contiguous_format)
        k = group["row_blocks"][i]
        buf = block_view(state["momentum_buffer"], k)[s:e]
        grad = block_view(p.grad, k)[s:e]
        return momentum_direction(grad, buf, group["momentum"], group["nesterov"])

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Full (consolidated) state in torch's layout; a collective when distributed."""
        return checkpoint.consolidated_state_dict(self)

    def sharded_state_dict(self) -> dict[str, Any]:
        """This rank's state only (owned Muon momentum + AdamW); no communication. Loads back
        only at the same world size and ownership plan."""
        return checkpoint.sharded_state_dict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a consolidated (any world size) or sharded (same world size) state dict."""
        checkpoint.load_state_dict(self, state_dict)
        self._stepped = True


def _blocks(p: torch.Tensor, row_blocks: int, name: str) -> torch.Tensor:
    """[B, r, c] *view* of a parameter, so in-place updates reach it."""
    b, r, c = block_shape(p.shape, row_blocks)
    try:
        return p.view(b, r, c)
    except RuntimeError:
        raise RuntimeError(f"Muon parameter {name!r} is not contiguous; Muon updates it through "
                           f"a [batch, rows, cols] view") from None


def _numel_chunks(entries: list, block_numel: int, cap: int):
    """Groups work entries (…, start, end) into chunks of at most `cap` elements."""
    chunk, n = [], 0
    for e in entries:
        k = (e[-1] - e[-2]) * block_numel
        if chunk and n + k > cap:
            yield chunk
            chunk, n = [], 0
        chunk.append(e)
        n += k
    if chunk:
        yield chunk
