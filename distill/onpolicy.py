"""Multi-teacher on-policy distillation: the student samples its own trajectories and is
trained to match, over the full vocabulary, the teacher of each prompt's domain (reverse KL).

    python -m distill.onpolicy init_from=runs/sft_mix/checkpoints/step_N \
        teachers='{strings: runs/grpo_strings/checkpoints/step_M, arith: ...}'
    deepspeed --num_gpus 2 --module distill.onpolicy ... ;  torchrun --nproc_per_node 2 -m distill.onpolicy ...
    python -m distill.onpolicy ... distill.kl=topk distill.topk=64 distill.domains=[strings:2,arith]

Hydra-configured (`conf/distill.yaml`, typed by `distill/config.py`), checkpoints and
`checkpoint.resume=auto` as everywhere else: the trainer core (`train/trainer.py`) runs the
loop, `distill/task.py` supplies the rollouts and the loss (`distill/loss.py`). Every teacher
is checked before any weights are read: it exists, is one of our (or a released) checkpoints,
has the student's vocabulary and tokenizer, and fits in memory next to the student (the plan
counts it, `train/plan.py`).
"""

from __future__ import annotations

import sys


def stage_problems(cfg, world: int) -> list[str]:
    """The `distill` section's problems (distill/config.py) and the rules between its keys."""
    from distill.config import distill_problems

    problems = distill_problems(cfg, world)
    d = cfg.distill
    ratio_terms = [name for name, on in (("kl=sampled", d.kl == "sampled"),
                                         ("reward_coef > 0", d.reward_coef > 0),
                                         ("opsm_delta", d.opsm_delta is not None)) if on]
    if ratio_terms and d.temperature != 1.0:
        problems.append(f"distill.temperature={d.temperature}: {', '.join(ratio_terms)} needs "
                        f"temperature 1 (they compare the student's temperature-1 log-probs "
                        f"with the sampler's, which are then π_old)")
    return problems


def teacher_dtype(cfg, student_bf16: bool):
    import torch

    if cfg.distill.teacher_dtype == "bf16" or (cfg.distill.teacher_dtype == "auto"
                                               and student_bf16):
        return torch.bfloat16
    return torch.float32


def check_teacher(name: str, path: str, model_cfg, tokenizer: str | None):
    """A teacher that is missing, not a model checkpoint, or of another vocabulary or
    tokenizer: an error naming it, before any weights are read. Returns its InitSource."""
    from train.init import InitFromError, check_tokenizer, inspect

    what = f"distill.teachers.{name}"
    src = inspect(path, what)
    if src.config.vocab_size != model_cfg.vocab_size:
        raise InitFromError(f"{what}={path}: vocabulary {src.config.vocab_size}, the student's "
                            f"{model_cfg.vocab_size}: a teacher must share the student's "
                            f"tokenizer (its distributions are over the same tokens): give a "
                            f"teacher trained from the same base as the student's init_from")
    check_tokenizer(src.tokenizer_file, tokenizer, what)
    return src


def pre_checks(cfg, model_cfg, world: int) -> dict | None:
    from train.init import inspect, stage_tokenizer

    from rl.rollout_config import reply_budget_warnings

    domains = build_domains(cfg)  # unknown domains, bad options
    if cfg.dry_run:  # a plan needs no weights or tokenizer
        return
    if cfg.init_from:
        inspect(cfg.init_from)
    else:
        print("warning: no init_from: the student starts from random weights", file=sys.stderr)
    tokenizer = stage_tokenizer(cfg, "distillation")
    for warning in reply_budget_warnings("distill", cfg.distill.max_new_tokens, cfg.data.seq_len,
                                         model_cfg.max_seq_len, tokenizer, domains):
        print(f"warning: {warning}", file=sys.stderr)
    for name, path in cfg.distill.teachers.items():
        check_teacher(name, path, model_cfg, tokenizer)
    return {"tokenizer_file": tokenizer, "domains": domains}


def build_domains(cfg):
    """(Domain, weight) of the prompt mixture (`distill.domains`, default the teachers')."""
    from data.domains.spec import build_domains as build

    from distill.config import domain_specs

    d = cfg.distill
    specs = [f"{n}:{w}" for n, w in domain_specs(d)]
    built = build(specs, d.domain_options, d.thinking_mode, "distill")
    if not built:
        raise ValueError("distill.domains=[]: give at least one domain")
    return built


def frozen_models(cfg, model_cfg) -> list:
    """The teachers, for the memory plan: each with its own config when its checkpoint can be
    read (a dry run may plan teachers that do not exist yet: the student's shapes then)."""
    from train.init import InitFromError, inspect
    from train.stage import cuda_requested, uses_bf16

    dtype = teacher_dtype(cfg, uses_bf16(cfg, cuda_requested(cfg)))
    planned = []
    for name, path in sorted(cfg.distill.teachers.items()):
        try:
            teacher_cfg = inspect(path, f"distill.teachers.{name}").config
        except InitFromError:
            if not cfg.dry_run:
                raise
            teacher_cfg = model_cfg
        planned.append((f"teacher {name}", teacher_cfg, dtype))
    return planned


def make_task(cfg, info, model_cfg, tokenizer_file: str | None = None, domains=None):
    from train.init import load_frozen_model, stage_tokenizer
    from train.stage import uses_bf16

    from distill.task import DistillTask

    dtype = teacher_dtype(cfg, uses_bf16(cfg, info.device.type == "cuda"))

    def loader(name: str, path: str):
        def load(ep_groups):  # once the student is built, sharded over its EP groups
            return load_frozen_model(path, info.device, dtype, ep_groups=ep_groups,
                                     what=f"distill.teachers.{name}").model
        return load

    loaders = {name: loader(name, path) for name, path in cfg.distill.teachers.items()}
    return DistillTask(cfg, info, model_cfg,
                       tokenizer_file or stage_tokenizer(cfg, "distillation"),
                       domains or build_domains(cfg), teacher_loaders=loaders)


# dict-valued keys a user sets whole (`distill.teachers='{a: P, b: Q}'`, or `teachers=...` as
# a short form): Hydra would merge such a value into the schema's empty dict and refuse the new
# keys, so they are passed as `++` (add or override) overrides
OPEN_DICTS = {"teachers": "distill.teachers", "distill.teachers": "distill.teachers",
              "distill.teacher_weights": "distill.teacher_weights"}


def open_dict_overrides(argv: list[str]) -> list[str]:
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        base = key.lstrip("+")
        for short, full in OPEN_DICTS.items():
            if eq and (base == short or base.startswith(short + ".")):
                arg = f"++{full}{base[len(short):]}={value}"
                break
        out.append(arg)
    return out


def main() -> None:
    from train.stage import Stage

    from distill.config import DistillTrainConfig
    from rl.rollout_config import register_resolver

    # conf/distill.yaml derives batch.global_batch from the distill section (the resolver)
    Stage("distill", make_task, schema=("distill_schema", DistillTrainConfig),
          problems=stage_problems, checks=pre_checks, frozen=frozen_models,
          resolvers=register_resolver, argv=open_dict_overrides, recipe=False).main()


if __name__ == "__main__":
    main()
