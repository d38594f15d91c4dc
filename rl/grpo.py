"""GRPO for domain experts (DeepSeek-V3.2's objective, Keep Routing, Keep Sampling Mask).

    python -m rl.grpo init_from=runs/sft_strings/checkpoints/step_00000300 grpo.domains=[strings]
    deepspeed --num_gpus 2 --module rl.grpo init_from=... ;  torchrun --nproc_per_node 2 -m rl.grpo ...
    python -m rl.grpo ... grpo.beta=0.01 grpo.top_p=0.95 grpo.dynamic_sampling=true

Hydra-configured (`conf/grpo.yaml`, typed by `rl/config.py`), checkpoints and
`checkpoint.resume=auto` as in pre-training: the trainer core (`train/trainer.py`) runs the
loop, `rl/grpo_task.py` supplies the rollouts and the loss (`rl/objective.py`).
"""

from __future__ import annotations

import os
import sys


def _betas(g) -> list[float]:
    return [float(g.beta), *map(float, g.beta_per_domain.values())]


def reference_path(cfg) -> str | None:
    """The reference weights: only when some β > 0 (β = 0 never loads a reference)."""
    if max(_betas(cfg.grpo)) <= 0:
        return None
    return cfg.grpo.ref or cfg.init_from


def stage_problems(cfg, world: int) -> list[str]:
    """The `grpo` section's problems (rl/config.py) and what GRPO does not support."""
    from rl.config import grpo_problems

    problems = grpo_problems(cfg, world)
    if cfg.parallel.ep_size > 1:
        problems.append(f"parallel.ep_size={cfg.parallel.ep_size}: GRPO does not support "
                        f"expert parallelism yet (use parallel.ep_size=1)")
    return problems


def pre_checks(cfg, model_cfg) -> None:
    from train.config import raise_problems
    from train.init import check_fits, check_tokenizer, inspect, stage_tokenizer
    from train.sft_task import build_domains

    world = (cfg.world_size if cfg.dry_run else None) or int(os.environ.get("WORLD_SIZE", "1"))
    raise_problems(stage_problems(cfg, world))
    build_domains(cfg.grpo, "grpo")  # unknown domains, bad options
    g = cfg.grpo
    if cfg.init_from:
        inspect(cfg.init_from)
    else:
        print("warning: no init_from: GRPO starts from random weights", file=sys.stderr)
    tokenizer = stage_tokenizer(cfg, "GRPO")
    ref = reference_path(cfg)
    if ref is not None:  # a reference that does not match the policy: named, before any work
        src = inspect(ref, "grpo.ref")
        check_fits(src, model_cfg, overridden=tuple(cfg.model.overrides or {}), what="grpo.ref")
        check_tokenizer(src.tokenizer_file, tokenizer, "grpo.ref")
    elif max(_betas(g)) > 0:
        raise ValueError("grpo.beta > 0 needs a reference policy: give init_from or grpo.ref")


def make_task(cfg, info, model_cfg):
    import torch

    from train.init import load_frozen_model, stage_tokenizer
    from train.sft_task import build_domains

    from rl.grpo_task import GRPOTask

    ref_model, ref = None, reference_path(cfg)
    if ref is not None:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(cfg.grpo.ref_dtype)
        if dtype is None and cfg.dtype == "bf16":
            dtype = torch.bfloat16
        ref_model = load_frozen_model(ref, info.device, dtype or torch.float32,
                                      what="grpo.ref").model
    return GRPOTask(cfg, info, model_cfg, stage_tokenizer(cfg, "GRPO"),
                    build_domains(cfg.grpo, "grpo"), ref_model)


def main() -> None:
    from omegaconf import OmegaConf

    from train.launch import hydra_main

    from rl.config import GRPOTrainConfig, samples_per_step

    # conf/grpo.yaml derives batch.global_batch from the grpo section
    if not OmegaConf.has_resolver("grpo_samples_per_step"):
        OmegaConf.register_new_resolver("grpo_samples_per_step", samples_per_step)

    hydra_main("grpo", make_task, pre_checks, schema=("grpo_schema", GRPOTrainConfig),
               stage_problems=stage_problems)


if __name__ == "__main__":
    main()
