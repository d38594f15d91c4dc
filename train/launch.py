"""What every stage's entry point does around its Task, once: validate the whole config before
any work, plan (`dry_run=true`), start the process group, save the resolved config, check fit and
resume, then run the trainer core. `train/pretrain.py`, `train/sft.py` and the post-training
entry points differ only in the Task they build (and checks of their own sections)."""

from __future__ import annotations

import functools
import os
import sys
import time
from typing import Callable

from omegaconf import OmegaConf

from model.config import ModelConfig

from .config import TrainConfig, sequences_at
from .stage import Stage, fixed_schedule, launch_world, uses_bf16


CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


def hydra_main(stage: Stage) -> None:
    """Runs `launch` under Hydra with `conf/<stage.config>.yaml` and the typed schema (the
    trainer's `train_schema`, plus the stage's own `(name, dataclass)` when given, e.g. GRPO's
    `grpo_schema`); DeepSpeed's `--local_rank` is stripped first so Hydra sees only its
    overrides."""
    import hydra

    from .config import register
    from .dist import strip_launcher_args

    args = strip_launcher_args(sys.argv[1:])
    sys.argv = [sys.argv[0], *(stage.argv(args) if stage.argv else args)]
    register()
    if stage.schema is not None:
        from hydra.core.config_store import ConfigStore

        ConfigStore.instance().store(name=stage.schema[0], node=stage.schema[1])

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=stage.config)
    def main(cfg: TrainConfig) -> None:
        launch(cfg, stage)

    main()


def model_config(cfg: TrainConfig) -> ModelConfig:
    from model.config import get_config

    return get_config(cfg.model.preset, **OmegaConf.to_container(cfg.model.overrides))


def _fail(message: str) -> SystemExit:
    """The message once, from rank 0; no traceback. The other ranks exit a moment later: a
    launcher (torchrun) stops every rank when the first one exits, which must not be one that
    exits before rank 0 has printed."""
    if int(os.environ.get("RANK", "0")) == 0:
        return SystemExit(message)
    time.sleep(3.0)
    return SystemExit(1)


STAGE_BUDGET_GIB = 120  # the dry run's per-rank budget for its stage lines (an H200 with room)


def stage_sizes(cfg: TrainConfig) -> list[tuple[int, int]]:
    """(seq_len, sequences per step at the final batch) of every stage (`batch.per_stage`)."""
    lengths = [s.seq_len for s in cfg.recipe.seq_len_stages] or [cfg.data.seq_len]
    return [(n, sequences_at(cfg, cfg.batch.global_batch, n) or 1) for n in lengths]


def launch(cfg: TrainConfig, stage: Stage) -> None:
    """Runs one `Stage` (train/stage.py): the stage's problems, then the trainer's, then the
    stage's checks, all before any data or model work; then a plan or a training run."""
    from .config import ConfigError, raise_problems, validate_config

    world = launch_world(cfg)
    if not stage.recipe:
        fixed_schedule(cfg)
    try:  # every key's range and the rules between keys, before any data or model work
        if stage.problems is not None:
            raise_problems(stage.problems(cfg, world))
        model_cfg = model_config(cfg)
        validate_config(cfg, world, model_cfg)
        # what the checks built (domains, the tokenizer) goes to the task: built once
        prepared = (stage.checks(cfg, model_cfg, world) if stage.checks else None) or {}
    except (ConfigError, ValueError) as e:
        raise _fail(f"{e}") from None
    frozen = list(stage.frozen(cfg, model_cfg)) if stage.frozen is not None else []
    if cfg.dry_run:
        _dry_run(cfg, model_cfg, world, frozen)
        return

    from .run_lock import RunDirLocked, RunLock

    try:  # one writer per run directory (global rank 0 holds it for the job)
        lock = RunLock(cfg.run_dir).acquire() if int(os.environ.get("RANK", "0")) == 0 else None
    except RunDirLocked as e:
        raise _fail(f"error: {e}") from None
    try:
        code = _train(cfg, functools.partial(stage.task, **prepared), model_cfg, frozen)
    finally:
        if lock is not None:
            lock.release()
    if code:  # stopped by a signal, checkpoint written: not a finished run
        raise SystemExit(code)



def _dry_run(cfg: TrainConfig, model_cfg: ModelConfig, world: int, frozen: list) -> None:
    """The plan of one rank at data.seq_len, then, with stages or CP, the smallest cp_size per
    stage (`train.plan_cp`); a layout the planner rejects is one `error:` line."""
    from .plan import make_plan
    from .plan_cp import stage_lines

    bf16 = uses_bf16(cfg, cuda=True)  # a plan is of the GPU run
    try:
        plan = make_plan(model_cfg, world, cfg.parallel.ep_size, cfg.data.micro_batch,
                         cfg.data.seq_len,
                         sequences_at(cfg, cfg.batch.global_batch, cfg.data.seq_len) or 1, bf16,
                         cfg.activation_checkpointing, frozen_models=frozen,
                         zero_stage=cfg.parallel.zero_stage, cp=cfg.parallel.cp_size)
    except ValueError as e:
        raise _fail(f"{e}") from None
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"dry run: conf={cfg.run_name} ({cfg.model.preset})\n{plan.format()}")
        stages = stage_sizes(cfg)
        if len(stages) > 1 or cfg.parallel.cp_size > 1:
            print("\n".join(stage_lines(
                model_cfg, world, cfg.parallel.ep_size, stages, STAGE_BUDGET_GIB,
                cfg.parallel.zero_stage, cfg.activation_checkpointing, cfg.data.micro_batch)))

def _train(cfg: TrainConfig, make_task: Callable, model_cfg: ModelConfig, frozen: list) -> int:
    """Process group, saved config, trainer and task; -> the trainer's exit code (0, or 128 +
    a stop signal). Mistakes in the user's files (data, checkpoints) end it as one line."""
    from data.config import DataError

    from .checkpoint import CheckpointError
    from .context_parallel import ContextParallelError
    from .dist import init_distributed
    from .init import adopt_tokenizer
    from .task import StageDeclined
    from .trainer import Trainer

    adopt_tokenizer(cfg)  # init_from without data.tokenizer: the checkpoint's tokenizer
    info = init_distributed(cfg.device)
    if info.is_main:
        os.makedirs(cfg.run_dir, exist_ok=True)
        with open(os.path.join(cfg.run_dir, "config.yaml"), "w") as f:
            f.write(OmegaConf.to_yaml(cfg, resolve=True))
    try:  # fit and resume checks before any data work
        trainer = Trainer(cfg, info, model_cfg, frozen_models=frozen)
        trainer.run(make_task(cfg, info, model_cfg))
    except (CheckpointError, DataError, FileNotFoundError, ContextParallelError) as e:
        raise _fail(f"error: {e}") from None
    except StageDeclined as e:  # nothing trained, nothing saved: say why, plainly
        if info.is_main:
            print(f"declined: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    return trainer.exit_code
