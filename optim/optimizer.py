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

Sharded master weights and optimizer state (`zero_stage` 1 or 2, the trainer's
`parallel.zero_stage`; see `optim.zero`): every parameter, not only Muon's, has an owner in its
shard domain (Muon's by Newton-Schulz cost as above, AdamW's by size). Only the owner keeps the
fp32 master copy of a bf16 parameter (`state["master"]`), the optimizer state and, at the step,
the fp32 reduced gradient. Call `accumulate_gradients` after every backward and
`finish_gradients` once at the accumulation boundary:
- stage 2: each micro-batch's gradient is summed onto its owner in fp32 right away and freed
  everywhere (fp32 gradients exist only on owners; one reduce per micro-batch);
- stage 1: each rank adds it into a local fp32 buffer of the full size, reduced to the owners
  once at the boundary (one reduce per step; full fp32 gradients on every rank until then).
- stage 3: as stage 2, but `optim.weight_sharding.BlockWeightSharding` (attached with
  `attach_weight_sharding`) also frees the blocks' weights on non-owners and reduces each
  block's gradients (`reduce_gradients_of`) as soon as its backward is complete;
  `accumulate_gradients` then completes the last block and reduces the parameters outside
  the blocks.
`step` updates the owned masters, writes them into the (bf16) parameters and the owners
broadcast them (at stage 3 only those outside the blocks: the others are gathered at their
next forward). The gradient norm (`grad_norm`) and clipping (`scale_gradients`) work on the
owners' shards. A reduce plus a broadcast per matrix is the volume of the all-reduce it replaces.

Checkpoints (`optim.checkpoint`): `state_dict` is consolidated (a collective; restores at any
world size; at stages 1 and 2 it holds every Muon momentum but AdamW state and masters only for
what this rank owns), `sharded_state_dict` is per rank (same world size and stage only; the
trainer reshards those files to any layout with `train.reshard`). `skip_next_step` makes the
next `step` a no-op, for non-finite losses.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

from . import checkpoint
from .adamw import adamw_init, adamw_step
from .distributed import assign_owners, broadcast_from_owners, chunk_by_size, group_rank_size, \
    ns_cost, reduce_to_owners, resolve_group
from .groups import logical_shape
from .muon import SCALE_MODES, block_shape, block_view, momentum_direction, orthogonalize, \
    update_scale
from .newton_schulz import default_ns_dtype, get_schedule

log = logging.getLogger("v4lab.optim")

_FLATTENED = ("was replaced by a tensor of another shape; a wrapper probably flattened or "
              "partitioned the parameters (DeepSpeed's ZeRO stages >= 1 do). Muon needs whole "
              "matrices: run DeepSpeed at ZeRO stage 0 and shard with v4lab's own "
              "parallel.zero_stage=1 or 2 (see optim.zero)")


class MuonAdamW(torch.optim.Optimizer):
    """Muon (hybrid Newton-Schulz) for `use_muon=True` groups, AdamW for the others."""

    def __init__(self, params: Iterable[dict[str, Any]], lr: float = 2.7e-4,
                 weight_decay: float = 0.1, momentum: float = 0.95, nesterov: bool = True,
                 ns_coefficients: Any = "hybrid10", ns_dtype: torch.dtype | None = None,
                 ns_eps: float = 1e-7, scale_mode: str = "match_rms", gamma: float = 0.18,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-20,
                 process_group: Any = None, bucket_numel: int = 1 << 26,
                 max_ns_batch_numel: int = 1 << 26, zero_stage: int = 0) -> None:
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
        if zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage={zero_stage}: choose 0 (replicated), 1, 2 or 3")
        self.zero_stage = int(zero_stage)
        self._local: dict[int, torch.Tensor] = {}  # id(param) → local fp32 gradient (stage 1)
        self._all_key: Any = None
        self._all_owners: list[int] = []
        self._acc: dict[int, torch.Tensor] = {}   # id(param) → owned fp32 gradient (sharded)
        self._weights = None  # stage 3: the BlockWeightSharding that reduces block gradients
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

    # ------------------------------------------------------------------ sharded gradients
    def _all_params(self):
        """(group, index, param, name) for every parameter, in a rank-independent order."""
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                yield group, i, p, group["param_names"][i]

    def all_owners(self) -> list[int]:
        """Owner rank (in its shard domain) of every parameter, in `_all_params` order: Muon's
        from `owners()`, AdamW's by size (longest first to the least-loaded rank)."""
        items = list(self._all_params())
        key = (tuple(id(self.shard_group_of(g)) for g, _, _, _ in items),
               tuple((tuple(p.shape), g["use_muon"]) for g, _, p, _ in items))
        if key != self._all_key:
            muon = iter(self.owners())
            owners = [next(muon) if g["use_muon"] else -1 for g, _, _, _ in items]
            for pg, ix in self._all_domains(items):
                adamw = [n for n in ix if owners[n] < 0]
                _, world = group_rank_size(pg)
                for n, o in zip(adamw, assign_owners([items[n][2].numel() for n in adamw],
                                                     world)):
                    owners[n] = o
            self._all_owners, self._all_key = owners, key
        return self._all_owners

    def _all_domains(self, items) -> list[tuple[Any, list[int]]]:
        domains: dict[int, tuple[Any, list[int]]] = {}
        for n, (g, _, _, _) in enumerate(items):
            pg = self.shard_group_of(g)
            domains.setdefault(id(pg), (pg, []))[1].append(n)
        return list(domains.values())

    def owns(self) -> list[bool]:
        """Whether this rank owns each parameter (in `_all_params` order)."""
        items = list(self._all_params())
        owners = self.all_owners()
        flags = [False] * len(items)
        for pg, ix in self._all_domains(items):
            me, _ = group_rank_size(pg)
            for n in ix:
                flags[n] = owners[n] == me
        return flags

    @property
    def sharded(self) -> bool:
        """Whether master weights, optimizer state and reduced gradients live on owners only."""
        return self.zero_stage > 0

    @torch.no_grad()
    def accumulate_gradients(self) -> None:
        """Sharded modes, after every backward: this micro-batch's `p.grad` moves into fp32,
        onto its owner (stage 2, a collective over each shard domain) or into this rank's
        local buffer (stage 1); `p.grad` is freed on every rank."""
        if not self.sharded:
            raise RuntimeError("accumulate_gradients needs MuonAdamW(zero_stage=1, 2 or 3)")
        if self.zero_stage == 3:
            self._stage3().finish_backward()  # the blocks' gradients, as their backward ended
            self._reduce(lambda p: p.grad, skip=self._weights.unit_param_ids)
        elif self.zero_stage == 2:
            self._reduce(lambda p: p.grad)
        else:
            for _, _, p, _ in self._all_params():
                if p.grad is not None:
                    local = self._local.get(id(p))
                    if local is None:
                        self._local[id(p)] = p.grad.detach().float()
                    else:
                        local.add_(p.grad.detach())
        for _, _, p, _ in self._all_params():
            p.grad = None

    @torch.no_grad()
    def finish_gradients(self) -> None:
        """Sharded modes, once at the accumulation boundary (stage 1: the reduce to owners)."""
        if self.zero_stage == 1:
            self._reduce(lambda p: self._local.get(id(p)))
            self._local.clear()

    def attach_weight_sharding(self, sharding) -> None:
        """Stage 3: `optim.weight_sharding.BlockWeightSharding` frees the blocks' weights on
        non-owners and calls `reduce_gradients_of` as each block's backward completes."""
        if self.zero_stage != 3:
            raise ValueError("weight sharding needs MuonAdamW(zero_stage=3)")
        self._weights = sharding

    def _stage3(self):
        if self._weights is None:
            raise RuntimeError("zero_stage=3: attach optim.weight_sharding.BlockWeightSharding("
                               "model, optimizer) before the first backward")
        return self._weights

    @torch.no_grad()
    def reduce_gradients_of(self, params: list[torch.Tensor]) -> None:
        """Stage 3, one block: its gradients summed onto their owners now and freed."""
        ids = {id(p) for p in params}
        self._reduce(lambda p: p.grad, only=ids)
        for p in params:
            p.grad = None

    def _reduce(self, grad_of, only: set[int] | None = None, skip: set[int] = frozenset()
                ) -> None:
        """Every gradient summed onto its owner in fp32 and divided by the data-parallel size
        (DeepSpeed's averaging), added to the owner's accumulated gradient. A parameter that
        requires grad but has none here (an expert no token reached) contributes zeros, so
        every rank issues the same collectives. `only` / `skip`: ids of the parameters to
        reduce or to leave out (stage 3 reduces block by block)."""
        items = list(self._all_params())
        owners = self.all_owners()
        _, dp = group_rank_size(self.process_group)
        for pg, ix in self._all_domains(items):
            ix = [n for n in ix if items[n][2].requires_grad and id(items[n][2]) not in skip
                  and (only is None or id(items[n][2]) in only)]
            if not ix:
                continue
            grads = [grad_of(items[n][2]) for n in ix]
            grads = [g if g is not None else torch.zeros_like(items[n][2])
                     for g, n in zip(grads, ix)]
            summed = reduce_to_owners(grads, [owners[n] for n in ix], pg, float(dp),
                                      self.bucket_numel)
            for k, g in summed.items():
                p = items[ix[k]][2]
                acc = self._acc.get(id(p))
                self._acc[id(p)] = g if acc is None else acc.add_(g)

    def grad_norm(self) -> float:
        """L2 norm of the full reduced gradient from the owners' shards (a collective over the
        data-parallel group: each parameter counted once, each expert once)."""
        total = torch.zeros((), dtype=torch.float64)
        for g in self._acc.values():
            total = total.to(g.device) + g.double().pow(2).sum()
        if self.process_group is not None:
            device = next(p for _, _, p, _ in self._all_params()).device
            total = total.to(device)
            dist.all_reduce(total, group=self.process_group)
        return float(total.sqrt())

    @torch.no_grad()
    def scale_gradients(self, factor: float) -> None:
        """Multiplies the owned gradients (gradient clipping in sharded mode)."""
        for g in self._acc.values():
            g.mul_(factor)

    def _grad(self, p: torch.Tensor) -> torch.Tensor | None:
        return self._acc.get(id(p)) if self.sharded else p.grad

    def _target(self, p: torch.Tensor) -> torch.Tensor:
        """What the update is applied to: the fp32 master of a bf16 parameter when sharded."""
        if not self.sharded or p.dtype == torch.float32:
            return p
        state = self.state[p]
        if "master" not in state:
            state["master"] = p.detach().float().clone(memory_format=torch.contiguous_format)
        return state["master"]

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._skip_next:
            self._skip_next = False
            self._acc.clear()
            self._local.clear()
            return loss
        if self.sharded:
            self._stepped = True
            self._sharded_step()
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

    def _sharded_step(self) -> None:
        """Owned parameters: Muon or AdamW update of the fp32 master (or the fp32 parameter),
        written back into the parameter; then every owner broadcasts."""
        self._muon_step(broadcast=False)
        items = list(self._all_params())
        stepped = [(group, p) for (group, _, p, _), mine in zip(items, self.owns())
                   if mine and id(p) in self._acc]
        for group, p in stepped:
            if not group["use_muon"]:
                adamw_step(self._target(p), self._acc[id(p)], self.state[p], lr=group["lr"],
                           betas=group["betas"], eps=group["eps"],
                           weight_decay=group["weight_decay"])
        for _, p in stepped:
            if "master" in self.state[p]:
                p.copy_(self.state[p]["master"])
        self._acc.clear()
        owners = self.all_owners()
        gathered_later = self._weights.unit_param_ids if self._weights is not None else ()
        for pg, ix in self._all_domains(items):  # stage 3: block weights wait for their gather
            ix = [n for n in ix if id(items[n][2]) not in gathered_later]
            broadcast_from_owners([items[n][2] for n in ix], [owners[n] for n in ix], pg,
                                  self.bucket_numel)

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

    def _muon_step(self, broadcast: bool = True) -> None:
        """Owned matrices: momentum, batched Newton-Schulz, update; then owners broadcast.

        Work is bucketed by block shape (one batched NS call per bucket) and cut into slices of
        at most `max_ns_batch_numel` elements, cutting stacked experts between experts, so the
        temporary fp32/bf16 copies stay bounded even for [256, 2048, 4096] expert stacks.
        """
        items = list(self._muon_params())
        work: dict[tuple, list] = defaultdict(list)
        for (group, i, p, name), mine in zip(items, self.owned_flags()):
            if not mine or self._grad(p) is None:
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
                    target = self._target(p)
                    w = _blocks(target, g["row_blocks"][i], name)[s:e]  # [e - s, r, c] view
                    w.mul_(1 - g["lr"] * g["weight_decay"])
                    w.add_(o.to(target.dtype), alpha=-g["lr"] * update_scale(
                        r, c, g["scale_mode"], g["gamma"]))
        if broadcast:
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
        grad = block_view(self._grad(p), k)[s:e]
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
    return chunk_by_size(entries, lambda e: (e[-1] - e[-2]) * block_numel, cap)
