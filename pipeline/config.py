"""Typed schema of `python -m pipeline` (`conf/pipeline.yaml`): which stages run, with which
settings, and how they are launched.

Each stage is one of the project's own entry points, run as a subprocess with Hydra overrides
(`train.pretrain`, `train.sft`, `rl.grpo`, `distill.onpolicy`, `train.evaluate`); this schema
only says which overrides. A stage's `overrides` are passed verbatim after the ones the
pipeline derives (run directory, `init_from`, domains, `steps`), so any key of that stage's own
config can be set here, and a wrong one fails in that stage with that stage's message. Domain
options (`difficulty`, ...) are given once per domain and reach every stage that builds the
domain and the evaluation harness.

Every value is checked by `pipeline_problems` before the first stage starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from train.config import _num, section_problems

LAUNCHERS = ("python", "deepspeed", "torchrun")


@dataclass
class StageSection:
    steps: int = _num(100, ">= 1")
    overrides: List[str] = field(default_factory=list)  # the stage's own Hydra overrides


@dataclass
class PretrainSection:
    # a finished pre-training checkpoint to start from; when it exists, pre-training is skipped
    # (the default is what the README's main job writes)
    reuse: Optional[str] = "runs/tiny/checkpoints/step_00000100"
    steps: int = _num(100, ">= 1")
    overrides: List[str] = field(default_factory=list)


@dataclass
class BandSection:
    # GRPO's first rollout outside the band (no reward variance): train the SFT expert this
    # many steps further and try again, at most `max_extensions` times (pipeline/expert_chain.py)
    extend_steps: int = _num(40, ">= 1")
    max_extensions: int = _num(0, ">= 0")


@dataclass
class DomainSection:
    options: Dict[str, Any] = field(default_factory=dict)  # domain constructor options
    weight: float = _num(1.0, "> 0")  # its share of the mixed-SFT and distillation prompts
    sft: StageSection = field(default_factory=StageSection)
    grpo: StageSection = field(default_factory=StageSection)
    band: BandSection = field(default_factory=BandSection)


@dataclass
class EvalSection:
    n: int = _num(100, ">= 1")                # held-out (test split) items per domain
    max_new_tokens: int = _num(64, ">= 1")    # per assistant turn
    examples: int = _num(2, ">= 0")           # student conversations per domain in the report
    overrides: List[str] = field(default_factory=list)


@dataclass
class PipelineConfig:
    name: str = "recipe"
    out_dir: str = "runs/${name}"
    conf: str = "tiny"                # model preset of every training stage (conf/conf/*.yaml)
    launcher: str = "python"          # python | deepspeed | torchrun
    nproc: int = _num(1, ">= 1")      # processes per training stage (deepspeed / torchrun)
    jobs: int = _num(2, ">= 1")       # stages run at once (domain chains are independent)
    # the recipe on this many pre-training seeds (out_dir/seed_<i>; seed 0 may reuse a base),
    # and out_dir/report.md with each figure's mean and spread over them
    seeds: int = _num(1, ">= 1")
    stage_timeout: float = _num(7200.0, "> 0")  # seconds per stage before it is stopped
    common: List[str] = field(default_factory=list)  # overrides of every training stage
    pretrain: PretrainSection = field(default_factory=PretrainSection)
    # name -> DomainSection; typed loosely so that `+domains.<new>={...}` works from the command
    # line, and checked against DomainSection by `domain_sections`
    domains: Dict[str, Any] = field(default_factory=dict)
    mixed_sft: StageSection = field(default_factory=StageSection)
    distill: StageSection = field(default_factory=StageSection)
    eval: EvalSection = field(default_factory=EvalSection)


def domain_sections(cfg: Any) -> tuple[dict[str, Any], list[str]]:
    """Each `domains.<name>` merged over DomainSection's defaults (typed), and the problems of
    the ones that do not fit it (an unknown key, a wrong type)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    sections, problems = {}, []
    for name, node in (cfg.domains or {}).items():
        try:
            sections[name] = OmegaConf.merge(OmegaConf.structured(DomainSection), node or {})
        except OmegaConfBaseException as error:
            key = getattr(error, "full_key", None)
            problems.append(f"domains.{name}{f'.{key}' if key else ''}: "
                            f"{str(error).splitlines()[0]}")
    return sections, problems


def pipeline_problems(cfg: Any) -> list[str]:
    """Every bad value at once, naming its key: ranges, the launcher, at least two domains,
    domains and options the registry knows (built before any stage runs)."""
    from data.domains import get_domain

    problems = section_problems(cfg, PipelineConfig, "")  # recurses into the sections
    if cfg.launcher not in LAUNCHERS:
        problems.append(f"launcher={cfg.launcher}: choose one of {', '.join(LAUNCHERS)}")
    if cfg.launcher == "python" and cfg.nproc != 1:
        problems.append(f"nproc={cfg.nproc}: launcher=python runs one process; use "
                        f"launcher=deepspeed or torchrun for more")
    if len(cfg.domains) < 2:
        problems.append(f"domains: {sorted(cfg.domains)}: the recipe distils at least two "
                        f"domain experts into one student")
    sections, bad = domain_sections(cfg)
    problems += bad
    for name, domain in sections.items():
        problems += section_problems(domain, DomainSection, f"domains.{name}.")
        try:
            get_domain(name, **dict(domain.options))
        except (ValueError, ImportError) as error:
            problems.append(f"domains.{name}: {error}")
    if not str(cfg.name) or "/" in str(cfg.name):
        problems.append(f"name={cfg.name!r}: a non-empty name without '/' (it names "
                        f"{cfg.out_dir})")
    return problems
