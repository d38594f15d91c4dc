"""Optimizers for v4lab: Muon with DeepSeek-V4's hybrid Newton-Schulz for matrices, AdamW for the
rest, in one `torch.optim.Optimizer`, sharded across data-parallel ranks by whole matrices; plus
learning-rate and batch-size schedules."""

from .build import build_optimizer
from .groups import (ADAMW_RULES, DEFAULT_ROW_SPLITS, DEFAULT_RULES, MUON_RULES, Rule, assign,
                     param_groups, summarize)
from .muon import block_view, update_scale
from .newton_schulz import SCHEDULES, NSSchedule, get_schedule, newton_schulz, scalar_map
from .optimizer import MuonAdamW
from .schedule import (LRSchedule, batch_size_ramp, cosine_schedule, linear_schedule, lr_lambda,
                       make_scheduler, v4_schedule, wsd_schedule)
from .zero import SUPPORTED_ZERO_STAGES, check_deepspeed_config, check_zero_stage

__all__ = [
    "ADAMW_RULES", "DEFAULT_ROW_SPLITS", "DEFAULT_RULES", "MUON_RULES", "LRSchedule", "MuonAdamW",
    "NSSchedule", "Rule", "SCHEDULES", "SUPPORTED_ZERO_STAGES", "assign", "batch_size_ramp",
    "block_view", "build_optimizer", "check_deepspeed_config", "check_zero_stage",
    "cosine_schedule", "get_schedule", "linear_schedule", "lr_lambda", "make_scheduler", "newton_schulz", "param_groups",
    "scalar_map", "summarize", "update_scale", "v4_schedule", "wsd_schedule",
]
