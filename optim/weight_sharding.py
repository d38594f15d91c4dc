"""ZeRO stage 3, whole-matrix: each block's bf16 weights live on their owners only.

Stage 2 (`MuonAdamW(zero_stage=2)`) already gives every parameter one owner in its shard domain,
which alone keeps the fp32 master, the optimizer state and the reduced fp32 gradient. What stays
replicated is the bf16 weight and one micro-batch's bf16 gradient: at `conf=pro` 26B dense
parameters, ~97 GiB per rank. Stage 3 frees both on every rank but the owner, for the
parameters of the transformer blocks (`model.layers` and the MTP blocks' inner block: all but
~1% of the parameters at the released shapes). The embedding, output head, final collapse and
the MTP blocks' own projections and norms stay replicated (stage 2): they are used outside any
one block's forward (the MTP block calls its inner block between them).

When a block's weights exist on a non-owner:
- **forward**: a forward pre-hook gathers the block (each owner broadcasts its matrices into
  the others' storages, re-grown with `storage.resize_`), a forward hook frees them again and,
  when the forward records a graph, hooks the block's outputs;
- **backward**: the first of the block's outputs whose gradient node runs gathers the block
  again, before any of the block's own nodes, so the block-checkpointed recompute sees the
  weights as well. Freeing and re-growing the *same* storage (through `p.data`, which has its
  own version counter) keeps every tensor autograd saved valid: FSDP1's trick.
- **gradients**: when the node of a block's *streams* output runs (that output is the next
  block's input, so the block below begins its backward), every block that began its backward
  before is complete. Its gradients are summed onto their owners in fp32 (stage 2's reduce,
  restricted to the block) and freed everywhere, and its weights are freed. Why complete:
  autograd's ready queue runs the node with the highest sequence number first, and every node
  of a block (the checkpoint's recomputed ones too) was created after the node producing the
  block's input, so all of them that will run at all have run. The lowest block completes in
  `finish_backward`, which `MuonAdamW.accumulate_gradients` calls. So at most one block's
  weights and bf16 gradients exist at a time beyond the owned share.

Every rank runs the same graph, so the hooks fire (and the collectives, EP all-to-alls
included, are issued) in the same order everywhere. Costs: a block's weights cross the wire
twice per micro-batch (forward and backward) instead of once per step, and there is no
prefetch; a GPU version would overlap the next block's broadcast with compute on a side stream.
Under a KV-cached generation each decode step gathers every block again, so rollouts at stage 3
are correct but communication-bound. Every forward is then a collective over the data-parallel
group, so the model gets a `forward_peer` (`ForwardPeer`) that generation's lockstep loop asks,
as it asks the expert-parallel dispatcher: ranks whose rows have finished keep running forwards
until no rank has work left.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from .distributed import broadcast_from_owners, group_rank_size

# parameters of an MTP block used outside its inner block's forward (model/mtp.py)
_MTP_OUTER = ("e_proj.", "h_proj.", "enorm.", "hnorm.", "norm.", "hc_head_")


@dataclass
class _Shared:
    name: str
    param: nn.Parameter
    owner: int
    group: Any
    mine: bool
    nbytes: int


@dataclass
class _Unit:
    index: int
    name: str
    params: list[_Shared] = field(default_factory=list)
    gathered: bool = True      # materialised at construction
    pending: bool = False      # a graph was recorded; its gradients are not reduced yet
    in_backward: bool = False


def sharded_block_params(name: str, block_is_mtp: bool) -> bool:
    """Whether parameter `name` (relative to its block) is gathered per block at stage 3."""
    return not (block_is_mtp and name.startswith(_MTP_OUTER))


class ForwardPeer:
    """What `model.generation.token_dispatcher` returns for a stage-3 model: every forward
    gathers weights over `group`, so all its ranks must run the same forwards (`collective`),
    and `any_active` is one max all-reduce of a flag over that group."""

    collective = True

    def __init__(self, group) -> None:
        self.group = group

    def any_active(self, flag: bool, device: torch.device | str | None = None) -> bool:
        t = torch.tensor([int(bool(flag))], dtype=torch.int32, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())


class BlockWeightSharding:
    """Frees every block weight this rank does not own and gathers it around the block's
    forward and backward (module doc). Attach after `deepspeed.initialize` (its start-up
    broadcast needs whole weights); `MuonAdamW(zero_stage=3)` then reduces each block's
    gradients as its backward completes."""

    def __init__(self, model: nn.Module, optimizer) -> None:
        if getattr(optimizer, "zero_stage", 0) != 3:
            raise ValueError("BlockWeightSharding needs MuonAdamW(zero_stage=3)")
        self.optimizer = optimizer
        owner_of: dict[int, tuple[int, Any]] = {}
        for (group, _, p, _), owner in zip(optimizer._all_params(), optimizer.all_owners()):
            owner_of[id(p)] = (owner, optimizer.shard_group_of(group))
        blocks = [(f"layers.{i}", b, False) for i, b in enumerate(model.layers)]
        blocks += [(f"mtp.{i}", b, True) for i, b in enumerate(model.mtp)]
        self.units: list[_Unit] = []
        for index, (prefix, block, is_mtp) in enumerate(blocks):
            unit = _Unit(index, prefix)
            for name, p in block.named_parameters():
                if id(p) not in owner_of or not sharded_block_params(name, is_mtp):
                    continue  # outside the optimizer, or used outside the block's forward
                owner, group = owner_of[id(p)]
                me, world = group_rank_size(group)
                if world == 1:
                    continue  # a local domain (experts with no expert-data-parallel peer)
                nbytes = p.numel() * p.element_size()
                storage = p.data.untyped_storage()
                if p.storage_offset() != 0 or storage.nbytes() != nbytes:
                    raise ValueError(f"{prefix}.{name}: shares its storage with other tensors; "
                                     f"zero_stage=3 frees each parameter's storage on its own")
                unit.params.append(_Shared(f"{prefix}.{name}", p, owner, group, owner == me,
                                           nbytes))
            self.units.append(unit)
            block.register_forward_pre_hook(lambda m, a, u=unit: self._gather(u))
            block.register_forward_hook(lambda m, a, out, u=unit: self._after_forward(u, out))
        self.unit_param_ids = {id(s.param) for u in self.units for s in u.params}
        self._pinned = 0  # open `gathered()` contexts: forwards then keep the weights
        optimizer.attach_weight_sharding(self)
        model._weight_sharding = self
        if optimizer.process_group is not None:
            model.forward_peer = ForwardPeer(optimizer.process_group)
        for unit in self.units:
            self._release(unit)

    # ------------------------------------------------------------------ gather / release
    @torch.no_grad()
    def _gather(self, unit: _Unit) -> None:
        if unit.gathered:
            return
        by_group: dict[int, list[_Shared]] = defaultdict(list)
        for s in unit.params:
            if not s.mine:
                s.param.data.untyped_storage().resize_(s.nbytes)
            by_group[id(s.group)].append(s)
        for items in by_group.values():  # first-use order: the same on every rank
            group = items[0].group
            broadcast_from_owners([s.param.data for s in items], [s.owner for s in items], group,
                                  self.optimizer.bucket_numel)
        unit.gathered = True

    def _release(self, unit: _Unit) -> None:
        if not unit.gathered or self._pinned:
            return
        for s in unit.params:
            if not s.mine:
                _free(s.param)
        unit.gathered = False

    # ------------------------------------------------------------------ hooks
    def _after_forward(self, unit: _Unit, output) -> None:
        if torch.is_grad_enabled() and isinstance(output, tuple) and len(output) == 2:
            streams, aux = output
            extra = [getattr(aux, k, None) for k in ("balance_loss", "indexer_loss")]
            for t, is_streams in [(streams, True), *((t, False) for t in extra)]:
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    unit.pending = True
                    t.register_hook(lambda g, u=unit, s=is_streams: self._before_backward(u, s))
        if not unit.in_backward:
            self._release(unit)

    def _before_backward(self, unit: _Unit, streams: bool) -> None:
        if streams:  # the block below begins: every block that began before is complete
            for other in self.units:
                if other is not unit and other.in_backward:
                    self._finish(other)
        self._gather(unit)
        unit.in_backward = True

    def _finish(self, unit: _Unit) -> None:
        """The block's gradients onto their owners (fp32), then its weights freed."""
        self.optimizer.reduce_gradients_of([s.param for s in unit.params])
        unit.in_backward = unit.pending = False
        self._release(unit)

    def finish_backward(self) -> None:
        """Completes every block still waiting (the lowest one, and any whose forward recorded
        a graph that no backward reached), highest first: the same order on every rank."""
        for unit in reversed(self.units):
            if unit.pending or unit.in_backward:
                self._finish(unit)

    # ------------------------------------------------------------------ whole weights
    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """Every block's weights on every rank (a collective), for checkpoints and checks
        that read the whole model; freed again afterwards (loaded values stay on owners)."""
        for unit in self.units:
            self._gather(unit)
        self._pinned += 1
        try:
            yield
        finally:
            self._pinned -= 1
            for unit in self.units:
                if not unit.in_backward:
                    self._release(unit)

    def resident_bytes(self) -> int:
        """Bytes of block weights this rank holds right now (for tests and logs)."""
        return sum(s.param.data.untyped_storage().nbytes() for u in self.units for s in u.params)


def _free(p: nn.Parameter) -> None:
    """Shrinks the parameter's storage to nothing. A storage exported to numpy (safetensors
    does that when saving) can no longer be resized: the parameter then gets a new one, which
    is safe outside forward and backward, the only place that can happen."""
    try:
        p.data.untyped_storage().resize_(0)
    except RuntimeError:
        p.data = torch.empty_like(p.data)
        p.data.untyped_storage().resize_(0)


def weights_gathered(model: nn.Module):
    """`BlockWeightSharding.gathered()` when the model is sharded at stage 3, else a no-op."""
    sharding = getattr(model, "_weight_sharding", None)
    return sharding.gathered() if sharding is not None else contextlib.nullcontext()
