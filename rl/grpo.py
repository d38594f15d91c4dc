"""GRPO for domain experts (DeepSeek-V3.2's objective, Keep Routing, Keep Sampling Mask).

    python -m rl.grpo init_from=runs/sft_strings/checkpoints/step_00000300 grpo.domains=[strings]
    deepspeed --num_gpus 2 --module rl.grpo init_from=... ;  torchrun --nproc_per_node 2 -m rl.grpo ...
    python -m rl.grpo ... grpo.beta=0.01 grpo.top_p=0.95 grpo.dynamic_sampling=true

Hydra-configured (`conf/grpo.yaml`, typed by `rl/config.py`), checkpoints and
`checkpoint.resume=auto` as in pre-training: the trainer core (`train/trainer.py`) runs the
loop, `rl/grpo_task.py` supplies the rollouts and the loss (`rl/objective.py`).
"""

from __future__ import annotations

import sys


def _betas(g) -> list[float]:
    return [float(g.beta), *map(float, g.beta_per_domain.values())]


def reference_path(cfg) -> str | None:
    """The reference weights: only when some β > 0 (β = 0 never loads a reference)."""
    if max(_betas(cfg.grpo)) <= 0:
        return None
    return cfg.grpo.ref or cfg.init_from


def stage_problems(cfg, world: int) -> list[str]:
    """The `grpo` section's problems (rl/config.py)."""
    from rl.config import grpo_problems

    return grpo_problems(cfg, world)


def pre_checks(cfg, model_cfg, world: int) -> dict | None:
    from data.domains.spec import section_domains
    from train.init import check_fits, check_tokenizer, inspect, stage_tokenizer

    from rl.rollout_config import reply_budget_warnings

    domains = section_domains(cfg.grpo, "grpo")  # unknown domains, bad options
    g = cfg.grpo
    if cfg.dry_run:  # a plan needs no weights or tokenizer
        return
    if cfg.init_from:
        inspect(cfg.init_from)
    else:
        print("warning: no init_from: GRPO starts from random weights", file=sys.stderr)
    tokenizer = stage_tokenizer(cfg, "GRPO")
    for warning in reply_budget_warnings("grpo", g.max_new_tokens, cfg.data.seq_len,
                                         model_cfg.max_seq_len, tokenizer, domains):
        print(f"warning: {warning}", file=sys.stderr)
    ref = reference_path(cfg)
    if ref is not None:  # a reference that does not match the policy: named, before any work
        src = inspect(ref, "grpo.ref")
        check_fits(src, model_cfg, overridden=tuple(cfg.model.overrides or {}), what="grpo.ref")
        check_tokenizer(src.tokenizer_file, tokenizer, "grpo.ref")
    elif max(_betas(g)) > 0:
        raise ValueError("grpo.beta > 0 needs a reference policy: give init_from or grpo.ref")
    return {"tokenizer_file": tokenizer, "domains": domains}


def ref_dtype(cfg, policy_bf16: bool):
    """The reference's weight dtype: grpo.ref_dtype, or the policy's (`auto`)."""
    import torch

    if cfg.grpo.ref_dtype == "bf16" or (cfg.grpo.ref_dtype == "auto" and policy_bf16):
        return torch.bfloat16
    return torch.float32


def frozen_models(cfg, model_cfg) -> list:
    """The reference policy (β > 0), for the memory plan: same shapes as the policy, in the
    dtype the trainer will use (a dry run plans bf16 unless dtype=fp32, as for the policy)."""
    from train.stage import cuda_requested, uses_bf16

    if max(_betas(cfg.grpo)) <= 0:  # planned even before its weights exist (dry runs)
        return []
    return [("reference", model_cfg, ref_dtype(cfg, uses_bf16(cfg, cuda_requested(cfg))))]


def make_task(cfg, info, model_cfg, tokenizer_file: str | None = None, domains=None):
    from data.domains.spec import section_domains
    from train.init import load_frozen_model, stage_tokenizer
    from train.stage import uses_bf16

    from rl.grpo_task import GRPOTask

    loader, ref = None, reference_path(cfg)
    if ref is not None:  # loaded once the policy is built, sharded over its EP groups
        bf16 = uses_bf16(cfg, info.device.type == "cuda")

        def loader(ep_groups):
            return load_frozen_model(ref, info.device, ref_dtype(cfg, bf16), ep_groups=ep_groups,
                                     what="grpo.ref").model
    return GRPOTask(cfg, info, model_cfg, tokenizer_file or stage_tokenizer(cfg, "GRPO"),
                    domains or section_domains(cfg.grpo, "grpo"), ref_loader=loader)


def main() -> None:
    from train.stage import Stage

    from rl.config import GRPOTrainConfig
    from rl.rollout_config import register_resolver

    # conf/grpo.yaml derives batch.global_batch from the grpo section (the resolver)
    Stage("grpo", make_task, schema=("grpo_schema", GRPOTrainConfig), problems=stage_problems,
          checks=pre_checks, frozen=frozen_models, resolvers=register_resolver,
          recipe=False).main()


if __name__ == "__main__":
    main()
