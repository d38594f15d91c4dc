"""A training entry point as one object: its config, its task and its checks.

    Stage("grpo", make_task, schema=("grpo_schema", GRPOTrainConfig), problems=grpo_problems,
          checks=pre_checks, frozen=frozen_models, resolvers=register_resolver).main()

`train/pretrain.py`, `train/sft.py`, `python -m rl.grpo` and `python -m distill.onpolicy` are
each one `Stage`; `train.launch.launch` runs any of them the same way (validate everything
before any work, plan on `dry_run=true`, start the process group, check fit and resume, run
the trainer core). What every entry needs from the launch environment is computed once, here:
- `launch_world(cfg)`: the world size (`world_size=` in a dry run, else the launcher's);
- `uses_bf16(cfg, cuda)`: the policy's dtype rule (`dtype=bf16`, or `auto` on a GPU; a dry
  run plans the GPU run), which frozen models with `*_dtype=auto` follow.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable


def launch_world(cfg: Any) -> int:
    return (cfg.world_size if cfg.dry_run else None) or int(os.environ.get("WORLD_SIZE", "1"))


def uses_bf16(cfg: Any, cuda: bool) -> bool:
    return cfg.dtype == "bf16" or (cfg.dtype == "auto" and (cuda or bool(cfg.dry_run)))


def cuda_requested(cfg: Any) -> bool:
    """Whether this run will train on a GPU (before the device is picked)."""
    import torch

    return torch.cuda.is_available() and cfg.device != "cpu"


def fixed_schedule(cfg: Any) -> None:
    """A post-training run's config as it runs (`train.schedule.StageSchedule`): from a
    trained checkpoint, sparse CSA from the first step, no indexer warm-up, no sequence-length
    stages, no batch ramp; what the validation, the memory plan and the saved config then see."""
    cfg.recipe.csa_dense_until = 0
    cfg.recipe.indexer_warmup_steps = 0
    cfg.recipe.seq_len_stages = []
    cfg.batch.ramp_start = None


@dataclass
class Stage:
    """`config`: conf/<config>.yaml. `task(cfg, info, model_cfg)`: the stage's `Task`, built
    after the trainer's checks. `schema`: the stage's own (name, dataclass) next to the
    trainer's `train_schema`. `problems(cfg, world)`: the stage section's problems, reported
    before the trainer's (they are usually the cause). `checks(cfg, model_cfg, world)`: files,
    checkpoints and tokenizers, before any work (raise ValueError naming the key); what they
    build (a dict: the domains, the tokenizer file) is passed on to `task` as keywords.
    `frozen(cfg, model_cfg)`: (name, ModelConfig, dtype) of the models held besides the policy
    (GRPO's reference, distillation's teachers), planned by `dry_run=true` and the fit check.
    `resolvers()`: OmegaConf resolvers the stage's YAML uses. `argv(args)`: rewrites the
    command line before Hydra reads it. `recipe`: the stage follows the pre-training recipe
    (phases, batch ramp, sequence-length stages: pre-training, SFT); False (GRPO,
    distillation): one phase and a fixed batch, so a preset's recipe keys (`conf=flash`'s
    stages and ramp) are set aside before anything reads them (`fixed_schedule`)."""

    config: str
    task: Callable
    schema: tuple[str, type] | None = None
    problems: Callable | None = None
    checks: Callable | None = None
    frozen: Callable | None = None
    resolvers: Callable | None = None
    argv: Callable | None = None
    recipe: bool = True

    def main(self) -> None:
        from .launch import hydra_main

        if self.resolvers is not None:
            self.resolvers()
        hydra_main(self)
