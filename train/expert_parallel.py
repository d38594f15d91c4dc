"""Expert parallelism (EP) for the trainer: groups, model sharding, gradient reduction, clipping,
checkpoint gather/slice and dispatch metrics. The model only ever sees dispatcher objects.

Layout (torchtitan's dp2ep, DeepSpeed's "E + D" order): EP ranks are carved out of the
data-parallel ranks. With world W and `parallel.ep_size` P (P divides W):

    expert-parallel groups      [0..P-1], [P..2P-1], ...   ranks holding *different* experts,
                                                           joined by the all-to-all
    expert-data-parallel groups {r : r % P == i}           ranks holding the *same* experts
    data-parallel group         all W ranks                attention, shared expert, router, ...

Rank r holds experts [(r % P)·E/P, (r % P + 1)·E/P) of every MoE layer (MTP blocks included).

Gradients (why this is right). With EP, the gradient an expert receives on its rank already
sums the contributions of every token routed to it from the P ranks of its EP group (the
backward all-to-all brings them home). Summing that over the expert-DP group (W/P replicas) and
dividing by W is therefore the same average over the global batch as EP = 1's all-reduce over W
ranks divided by W. DeepSpeed 0.19.8 implements exactly that reduction (`_reduce_expert_gradients`:
sum over `groups._get_expert_data_parallel_group(name)`, divide by the full DP size) for params
with `allreduce=False` and `group_name`, but only when `engine.has_moe_layers`, which it sets for
its own MoE modules only. So we create its expert groups via `deepspeed.utils.groups` *before*
`deepspeed.initialize` (its start-up broadcast then syncs experts only within their expert-DP
group; without the marks it would overwrite rank 1's experts with rank 0's), and set
`has_moe_layers` after. Tests compare every gradient and weight with an EP = 1 run.

Clipping: DeepSpeed's fp32 clipping averages per-rank norms, which is wrong once ranks hold
different parameters, so with EP the trainer disables it and clips with `global_grad_norm`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from model.config import ModelConfig
from model.dispatcher import AllToAllDispatcher

EXPERT_PARAM = re.compile(r"\.ffn\.experts\.w[123]$")


@dataclass
class EPGroups:
    ep_size: int
    ep_rank: int
    name: str                # DeepSpeed's group name, "ep_size_{P}"
    ep_group: Any            # ranks holding different experts (all-to-all)
    expert_dp_group: Any     # ranks holding the same experts (gradient reduction, Muon owners)
    expert_dp_size: int


def validate(model_cfg: ModelConfig, world: int, ep_size: int, zero_stage: int = 0) -> None:
    """Clear errors before any allocation."""
    if ep_size < 1:
        raise ValueError(f"parallel.ep_size={ep_size}: must be >= 1")
    if model_cfg.n_routed_experts % ep_size:
        raise ValueError(f"parallel.ep_size={ep_size} must divide n_routed_experts="
                         f"{model_cfg.n_routed_experts} (routed experts are split evenly)")
    if world % ep_size:
        raise ValueError(f"parallel.ep_size={ep_size} must divide the world size {world} "
                         f"(EP ranks are carved out of the data-parallel ranks)")
    if ep_size > 1 and zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"parallel.ep_size={ep_size} with parallel.zero_stage={zero_stage}: "
                         f"expert parallelism is supported with ZeRO stages 0 to 3")


def is_expert_param(name: str) -> bool:
    return EXPERT_PARAM.search(name) is not None


def create_groups(ep_size: int) -> EPGroups:
    """DeepSpeed's expert and expert-data-parallel groups (collective: call on every rank)."""
    import deepspeed
    from deepspeed.utils import groups

    if not deepspeed.comm.is_initialized():  # torch.distributed already is (e.g. tests)
        deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)
        from .dist import release_shm_workspace

        release_shm_workspace()
    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    ep_group = groups._get_expert_parallel_group(name)
    edp_group = groups._get_expert_data_parallel_group(name)
    ep_rank = dist.get_rank(ep_group)
    if ep_rank != dist.get_rank() % ep_size:
        raise RuntimeError(f"unexpected DeepSpeed expert-group layout: rank {dist.get_rank()} "
                           f"has ep_rank {ep_rank}, expected {dist.get_rank() % ep_size}")
    return EPGroups(ep_size, ep_rank, name, ep_group, edp_group, dist.get_world_size(edp_group))


def shard_model(model, g: EPGroups) -> None:
    """Slices the expert stacks to this rank's experts, installs all-to-all dispatchers and
    marks the expert parameters for DeepSpeed's expert-group reduction."""
    n_exp = model.cfg.n_routed_experts
    model.shard_experts(g.ep_rank, g.ep_size,
                        lambda layer_id: AllToAllDispatcher(n_exp, g.ep_rank, g.ep_size,
                                                            g.ep_group))
    mark_expert_params(model, g)


def mark_expert_params(model, g: EPGroups) -> None:
    """Tags the expert parameters for DeepSpeed (`allreduce=False`, `group_name`): its start-up
    broadcast and gradient reduction then stay within the expert-data-parallel group.

    The tags are attributes of the Parameter objects, so anything that replaces them drops the
    tags: `to_empty` (meta → device) and `load_state_dict(assign=True)` do. Call this again
    after them; `check_expert_marks` verifies before the engine is built."""
    for name, p in model.named_parameters():
        if is_expert_param(name):
            p.allreduce = False
            p.group_name = g.name


def check_expert_marks(model, g: EPGroups) -> None:
    """Unmarked experts would be broadcast from rank 0 over the whole data-parallel group (every
    rank would hold rank 0's experts) and their gradients averaged across experts."""
    bad = [name for name, p in model.named_parameters() if is_expert_param(name)
           and (getattr(p, "allreduce", True) or getattr(p, "group_name", None) != g.name)]
    if bad:
        raise RuntimeError(f"expert parallelism: {len(bad)} expert parameters lost their "
                           f"DeepSpeed expert-group tags (first: {bad[0]}); call "
                           f"mark_expert_params after replacing parameters")


def attach_engine(engine) -> None:
    """Turns on DeepSpeed's expert-gradient reduction for our (non-DeepSpeed) MoE layers."""
    from deepspeed.utils import groups

    engine.has_moe_layers = True
    engine.expert_parallel_group = groups._get_expert_parallel_group_dict()
    engine.expert_data_parallel_group = groups._get_expert_data_parallel_group_dict()


def optimizer_shard_group(g: EPGroups):
    """What Muon owns expert matrices over: the expert-DP group, or "local" if it is one rank."""
    return "local" if g.expert_dp_size == 1 else g.expert_dp_group


# ---------------------------------------------------------------------------------- norms
def global_grad_norm(model, g: EPGroups | None) -> float:
    """L2 norm of the full model's (already reduced) gradient, as EP = 1 would compute it:
    replicated parameters counted once, each expert once (summed over the EP group)."""
    device = next(model.parameters()).device
    dense = torch.zeros((), dtype=torch.float64, device=device)    # on device: one host sync
    expert = torch.zeros((), dtype=torch.float64, device=device)
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        sq = p.grad.detach().double().pow(2).sum()
        if g is not None and is_expert_param(name):
            expert += sq
        else:
            dense += sq
    if g is not None and g.ep_size > 1:
        dist.all_reduce(expert, group=g.ep_group)
    return float((dense + expert).sqrt())


def clip_coefficient(max_norm: float, norm: float) -> float:
    """torch's clip_grad_norm_ factor, max_norm / (norm + 1e-6) capped at 1; 1 when clipping is
    off or the norm is NaN (that step is skipped)."""
    if max_norm <= 0 or not norm == norm:
        return 1.0
    return min(1.0, max_norm / (norm + 1e-6))


@torch.no_grad()
def clip_grads_(model, max_norm: float, norm: float) -> None:
    """torch's clip_grad_norm_ rule (coefficient max_norm / (norm + 1e-6), capped at 1)."""
    coef = clip_coefficient(max_norm, norm)
    if coef < 1.0:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(coef)


# ---------------------------------------------------------------------------------- checkpoints
@torch.no_grad()
def full_state_dict(model, g: EPGroups | None) -> dict[str, torch.Tensor]:
    """The model's state with full `[E, ...]` expert stacks (a collective over the EP group when
    sharded: every rank must call it; all get the full dict)."""
    state = model.state_dict()
    if g is None or g.ep_size == 1:
        return state
    out = {}
    for name, t in state.items():
        if is_expert_param(name):
            parts = [torch.empty_like(t) for _ in range(g.ep_size)]
            dist.all_gather(parts, t.contiguous(), group=g.ep_group)
            t = torch.cat(parts, dim=0)
        out[name] = t
    return out


def local_state_dict(full: dict[str, torch.Tensor], ep_rank: int,
                     ep_size: int) -> dict[str, torch.Tensor]:
    """Slices full expert stacks to rank `ep_rank`'s experts (any ep_size dividing E): the
    checkpoint layout does not depend on the ep_size it was written with."""
    out = {}
    for name, t in full.items():
        if is_expert_param(name):
            if t.shape[0] % ep_size:
                raise ValueError(f"{name}: {t.shape[0]} experts cannot be split over "
                                 f"parallel.ep_size={ep_size}")
            n = t.shape[0] // ep_size
            t = t[ep_rank * n:(ep_rank + 1) * n]
        out[name] = t
    return out


# ---------------------------------------------------------------------------------- metrics
def dispatch_metrics(model, g: EPGroups | None, counts: torch.Tensor | None = None) -> dict:
    """All-to-all bytes and dispatch/combine seconds since the last call (this rank; then reset),
    and the share of routed copies each EP rank's experts received (from global counts
    [n_blocks, E]). Times are host wall-clock; on GPU they include kernel launches only."""
    bytes_sent, t_dispatch, t_combine = 0, 0.0, 0.0
    for m in model.modules():
        stats = getattr(getattr(m, "dispatcher", None), "stats", None)
        if stats is not None:
            bytes_sent += stats.bytes_sent
            t_dispatch += stats.dispatch_seconds
            t_combine += stats.combine_seconds
            stats.bytes_sent, stats.dispatch_seconds, stats.combine_seconds = 0, 0.0, 0.0
            stats.calls = 0
    out = {}
    if g is None or g.ep_size == 1:
        return out
    out.update({"ep/all_to_all_bytes": float(bytes_sent), "ep/dispatch_seconds": t_dispatch,
                "ep/combine_seconds": t_combine})
    if counts is not None:
        per_rank = counts.float().sum(0).view(g.ep_size, -1).sum(1)          # [ep]
        share = per_rank / per_rank.sum().clamp_min(1)
        out.update({f"ep/load_rank{r}": float(v) for r, v in enumerate(share)})
        out["ep/load_imbalance"] = float(share.max() * g.ep_size)
    return out
