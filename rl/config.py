"""Typed schema of `python -m rl.grpo` (`conf/grpo.yaml`): the trainer's `TrainConfig` plus a
`grpo` section. Every numeric field carries its range, checked at start-up with the rest of the
config (`grpo_problems`), before any weights or data are touched.

Batch arithmetic. One rollout draws `prompts_per_step` prompts (B) and samples `group_size`
(G) completions each; its B·G samples are cut into `updates` (μ) mini-batches, one optimizer
step each. So `batch.global_batch` (samples per optimizer step) is B·G/μ, and the entry point
derives it from these three (`conf/grpo.yaml` interpolates it; a different value is an error). B must be a multiple of the world size (each rank rolls out B/world prompts) and B·G/μ a
multiple of `data.micro_batch` × world.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from data.domains.spec import parse_domain_spec
from train.config import TrainConfig, _num, section_problems

from rl.objective import ADV_NORMS, LOSS_AGGS
from rl.rollout_config import RolloutSection, rollout_batch_problems

OVERLONG = ("mask", "penalty", "none")


@dataclass
class GRPOSection(RolloutSection):
    """The rollout keys (`rl.rollout_config.RolloutSection`: domains, B, G, μ, sampling,
    verification, routing replay, off-policy masking, evaluation) and GRPO's own."""

    domains: List[str] = field(default_factory=lambda: ["strings"])
    # --- rewards (group_size >= 2: a group needs peers)
    length_penalty: float = _num(0.0, ">= 0")  # reward -= this x generated / max_new_tokens
    overlong: str = "mask"                     # truncated samples: mask | penalty (DAPO) | none
    overlong_buffer: int = _num(16, ">= 1")    # DAPO soft-penalty window (tokens)
    overlong_penalty: float = _num(1.0, ">= 0")  # DAPO soft penalty at the hard limit
    dynamic_sampling: bool = False             # DAPO: drop zero-variance groups and refill
    # a first rollout with reward variance in < rl.grpo_task.MIN_VARIED_GROUPS of its groups:
    # warn (train anyway; such steps are held) | stop (exit 3 before any update, band.json says why)
    band: str = "warn"
    max_refill_rounds: int = _num(3, ">= 0")
    # --- objective (rl/objective.py)
    adv_norm: str = "mean"                     # mean (V3.2) | mean_std (R1)
    loss_agg: str = "seq-mean-token-mean"
    clip_low: float = _num(0.2, "[0, 1)")
    clip_high: float = _num(0.28, ">= 0")
    beta: float = _num(0.0, ">= 0")            # KL to the reference; 0 skips the reference model
    beta_per_domain: Dict[str, float] = field(default_factory=dict)  # domain -> β override
    kl_unbiased: bool = True                   # V3.2's ratio-weighted k3; false: plain k3
    recompute_old_logprobs: bool = False       # π_old from a forward before the first update
    ref: Optional[str] = None                  # reference weights; None: init_from
    ref_dtype: str = "auto"                    # auto (the policy's) | fp32 | bf16
    # --- MoE and MTP during RL
    router_bias_updates: bool = False
    train_mtp: bool = False


@dataclass
class GRPOTrainConfig(TrainConfig):
    grpo: GRPOSection = field(default_factory=GRPOSection)


def grpo_problems(cfg: Any, world: int) -> list[str]:
    """Every problem with the `grpo` section and its batch arithmetic, one line per key."""
    g = cfg.grpo
    problems = section_problems(g, GRPOSection, "grpo.")
    for key, value, allowed in (("grpo.adv_norm", g.adv_norm, ADV_NORMS),
                                ("grpo.loss_agg", g.loss_agg, LOSS_AGGS),
                                ("grpo.overlong", g.overlong, OVERLONG),
                                ("grpo.thinking_mode", g.thinking_mode, ("chat", "thinking")),
                                ("grpo.ref_dtype", g.ref_dtype, ("auto", "fp32", "bf16")),
                                ("grpo.band", g.band, ("warn", "stop"))):
        if value not in allowed:
            problems.append(f"{key}={value!r}: choose one of {', '.join(allowed)}")
    if isinstance(g.group_size, int) and g.group_size < 2:
        problems.append(f"grpo.group_size={g.group_size}: GRPO needs >= 2 samples per prompt "
                        f"(the advantage compares a sample with its group)")
    if problems:
        return problems
    problems += rollout_batch_problems(g, "grpo.", cfg, world, "GRPO")
    unknown = sorted(set(g.beta_per_domain) - {parse_domain_spec(str(d))[0] for d in g.domains})
    if unknown:
        problems.append(f"grpo.beta_per_domain: {unknown} not in grpo.domains={list(g.domains)}")
    return problems
