"""`build_optimizer`: the one call the trainer makes (grouping + `MuonAdamW` + start-up log)."""

from __future__ import annotations

import logging
import re
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .groups import DEFAULT_RULES, Rule, param_groups, summarize
from .optimizer import MuonAdamW

log = logging.getLogger("v4lab.optim")

EXPERT_PATTERN = r"\.ffn\.experts\.w[123]$"


def split_expert_groups(groups: list[dict[str, Any]], shard_group: Any,
                        pattern: str = EXPERT_PATTERN,
                        include_adamw: bool = False) -> list[dict[str, Any]]:
    """Each Muon group (and AdamW group, with `include_adamw`) whose parameters match `pattern`
    is split in two: the rest, and the matches carrying `shard_group` (see
    `MuonAdamW.shard_group_of`). Order is kept so every rank builds the same groups."""
    out = []
    for g in groups:
        if not g["use_muon"] and not include_adamw:
            out.append(g)
            continue
        hit = [bool(re.search(pattern, n)) for n in g["param_names"]]
        for want in (False, True):
            idx = [i for i, h in enumerate(hit) if h == want]
            if not idx:
                continue
            part = {k: v for k, v in g.items()}
            for key in ("params", "param_names", "row_blocks"):
                if key in g:
                    part[key] = [g[key][i] for i in idx]
            if want:
                part["shard_group"] = shard_group
            out.append(part)
    return out


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1,
                    muon_momentum: float = 0.95, ns_coefficients: Any = "hybrid10",
                    adamw_betas: tuple[float, float] = (0.9, 0.95), adamw_eps: float = 1e-20,
                    process_group: Any = None, *, nesterov: bool = True,
                    gamma: float = 0.18, scale_mode: str = "match_rms",
                    ns_dtype: torch.dtype | None = None,
                    adamw_weight_decay: float | None = None,
                    rules: Iterable[Rule] = DEFAULT_RULES,
                    overrides: Mapping[str, str] | None = None,
                    row_splits: Mapping[str, int | str] | None = None,
                    model_config: Any = None, expert_process_group: Any = None,
                    expert_pattern: str = EXPERT_PATTERN,
                    zero_stage: int = 0) -> MuonAdamW:
    """Muon for the model's matrices, AdamW for the rest (see `optim.groups`), one optimizer.

    `lr` is the AdamW-style peak learning rate for both halves (γ-scaling makes Muon's update
    RMS match AdamW's). `process_group` is the data-parallel group (None → the default group when
    distributed). `adamw_weight_decay` defaults to `weight_decay`.

    Expert parallelism: `expert_process_group` (a process group, or "local") moves the Muon
    parameters whose names match `expert_pattern` (the routed-expert stacks) into their own
    groups whose matrices are owned within that group (their expert-data-parallel group), not
    across the data-parallel group whose ranks hold other experts.
    """
    groups = param_groups(model, rules=rules, overrides=overrides, row_splits=row_splits,
                          model_config=model_config)
    if expert_process_group is not None:
        groups = split_expert_groups(groups, expert_process_group, expert_pattern)
    for g in groups:
        if not g["use_muon"] and adamw_weight_decay is not None:
            g["weight_decay"] = adamw_weight_decay
    opt = MuonAdamW(groups, lr=lr, weight_decay=weight_decay, momentum=muon_momentum,
                    nesterov=nesterov, ns_coefficients=ns_coefficients, ns_dtype=ns_dtype,
                    scale_mode=scale_mode, gamma=gamma, betas=adamw_betas, eps=adamw_eps,
                    process_group=process_group, zero_stage=zero_stage)
    log.info(summarize(groups))
    return opt
