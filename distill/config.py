"""Typed schema of `python -m distill.onpolicy` (`conf/distill.yaml`): the trainer's
`TrainConfig` plus a `distill` section, checked at start-up (`distill_problems`) before any
weights or data are touched.

Teachers are keyed by domain: `distill.teachers={strings: PATH, arith: PATH}` makes each prompt
of domain `strings` match the `strings` teacher. `distill.domains` (default: the teachers'
domains, weight 1 each) mixes the prompts, "name" or "name:weight"; every domain needs a
teacher. `distill.teacher_weights={d: {t1: w1, t2: w2}}` replaces a domain's one-hot teacher by
a mixture Σ_k w_k·KL(π_θ ‖ π_k) (weights ≥ 0, summing to 1).

Batch arithmetic as in GRPO: one rollout of B prompts × G samples is cut into μ mini-batches,
so `batch.global_batch` = B·G/μ (derived by `conf/distill.yaml`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict

from data.domains.spec import parse_domain_spec
from train.config import TrainConfig, _num, section_problems

from distill.loss import KL_MODES
from rl.rollout_config import RolloutSection, rollout_batch_problems


@dataclass
class DistillSection(RolloutSection):
    """The rollout keys (`rl.rollout_config.RolloutSection`; here the student samples, and
    `domains` empty means the teachers' domains, weight 1 each) and distillation's own."""

    teachers: Dict[str, str] = field(default_factory=dict)  # domain -> teacher checkpoint
    teacher_weights: Dict[str, Dict[str, float]] = field(default_factory=dict)
    prompts_per_step: int = _num(16, ">= 1")
    group_size: int = _num(1, ">= 1")
    # --- loss (distill/loss.py)
    kl: str = "full"                          # full | topk | sampled
    topk: int = _num(32, ">= 1")              # kl=topk: the teacher's top-k plus a tail bucket
    kl_chunk: int = _num(1024, ">= 1")        # tokens per [tokens, vocab] chunk
    reward_coef: float = _num(0.0, ">= 0")    # + coef x GRPO-style task-reward term (G >= 2)
    mtp_weight: float = _num(0.0, ">= 0")     # > 0: distil the MTP block too (trains it)
    teacher_dtype: str = "auto"               # auto (the student's) | fp32 | bf16
    # the teachers are evaluated once, at the first evaluation (`eval_n` > 0)
    eval_teachers: bool = True


@dataclass
class DistillTrainConfig(TrainConfig):
    distill: DistillSection = field(default_factory=DistillSection)


def domain_specs(d: Any) -> list[tuple[str, float]]:
    """(domain, weight) of the prompt mixture: `distill.domains`, or the teachers' domains."""
    if d.domains:
        return [parse_domain_spec(str(e), "distill") for e in d.domains]
    return [(name, 1.0) for name in d.teachers]


def teacher_weights(d: Any, domain: str) -> dict[str, float]:
    """{teacher: weight} for a prompt of `domain` (one-hot unless `teacher_weights` says)."""
    given = d.teacher_weights.get(domain)
    return dict(given) if given else {domain: 1.0}


def distill_problems(cfg: Any, world: int) -> list[str]:
    """Every problem with the `distill` section, one line per key (no file is read here)."""
    d = cfg.distill
    problems = section_problems(d, DistillSection, "distill.")
    for key, value, allowed in (("distill.kl", d.kl, KL_MODES),
                                ("distill.thinking_mode", d.thinking_mode, ("chat", "thinking")),
                                ("distill.teacher_dtype", d.teacher_dtype,
                                 ("auto", "fp32", "bf16"))):
        if value not in allowed:
            problems.append(f"{key}={value!r}: choose one of {', '.join(allowed)}")
    if not d.teachers:
        problems.append("distill.teachers={}: give one teacher checkpoint per domain, e.g. "
                        "distill.teachers='{strings: runs/grpo_strings/checkpoints/step_N}'")
    try:
        specs = domain_specs(d)
    except ValueError as e:
        problems.append(str(e))
        specs = []
    names = [n for n, _ in specs]
    for name in names:
        if name not in d.teachers and name not in d.teacher_weights:
            problems.append(f"distill.domains: {name!r} has no teacher (distill.teachers has "
                            f"{sorted(d.teachers)}; add one or a distill.teacher_weights.{name} "
                            f"mixture)")
    for domain, mix in d.teacher_weights.items():
        if domain not in names:
            problems.append(f"distill.teacher_weights.{domain}: not in the prompt domains "
                            f"{names}")
        unknown = sorted(set(mix) - set(d.teachers))
        if unknown:
            problems.append(f"distill.teacher_weights.{domain}: teachers {unknown} are not in "
                            f"distill.teachers")
        values = list(mix.values())
        if any(v < 0 for v in values) or not math.isclose(sum(values), 1.0, abs_tol=1e-6):
            problems.append(f"distill.teacher_weights.{domain}={dict(mix)}: weights must be "
                            f">= 0 and sum to 1")
    unknown = sorted(set(d.domain_options) - set(names))
    if unknown:
        problems.append(f"distill.domain_options: {unknown} not in the prompt domains {names}")
    if d.reward_coef > 0 and d.group_size < 2:
        problems.append(f"distill.reward_coef={d.reward_coef} needs distill.group_size >= 2 (the "
                        f"task-reward advantage compares a sample with its group)")
    if d.kl == "topk" and d.topk < 1:
        problems.append(f"distill.topk={d.topk}: must be >= 1")
    if problems:
        return problems
    return rollout_batch_problems(d, "distill.", cfg, world, "distillation")
