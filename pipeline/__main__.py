"""The whole DeepSeek-V4 recipe in one command: pre-training, one expert per domain (SFT, then
GRPO), on-policy distillation of the experts into one student, the evaluation harness on every
checkpoint, and a report.

    python -m pipeline                              # tiny preset, this CPU, ~30 minutes
    python -m pipeline name=mine jobs=1 distill.steps=200
    python -m pipeline name=seeds seeds=3            # three pre-training seeds, mean ± sd
    python -m pipeline conf=small launcher=deepspeed nproc=8 jobs=1 \\
        pretrain.reuse=runs/small/checkpoints/step_00010000 ...   # a GPU machine

Hydra-configured (`conf/pipeline.yaml`, typed by `pipeline/config.py`). Every stage is the
project's own entry point in a subprocess (`pipeline/stages.py`), so each stage is exactly what
its own command does. Re-running the command skips the stages whose outputs are complete and
resumes an interrupted one from its newest checkpoint; `report.md` and its plots are written
again at the end of every run (`pipeline/report.py`).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


def run(cfg) -> int:
    from pathlib import Path

    from pipeline.average import weight_average
    from pipeline.config import pipeline_problems
    from pipeline.stages import build_stages
    from train.run_lock import RunDirLocked, RunLock

    problems = pipeline_problems(cfg)
    if problems:
        sys.stderr.write("error: bad pipeline config:\n" + "".join(f"  {p}\n" for p in problems))
        return 2
    out = Path(cfg.out_dir)
    try:  # one pipeline per folder; each stage's trainer locks its own run directory too
        lock = RunLock(out, "pipeline folder").acquire()
    except RunDirLocked as error:
        sys.stderr.write(f"error: {error}\n")
        return 2
    try:
        return run_locked(cfg, out, build_stages(cfg, weight_average))
    finally:
        lock.release()


def run_locked(cfg, out, stages) -> int:
    from pipeline.report import write_report
    from pipeline.runner import PipelineStopped, Runner, StageFailed, log
    from pipeline.seeds_report import write_seeds_report
    from pipeline.stages import seed_dir

    todo = [s.name for s in stages if not s.done()]
    log(f"pipeline {cfg.name}: {len(stages)} stages, {len(todo)} to run, {cfg.jobs} at a time; "
        f"output {out}")
    try:
        Runner(out, cfg.launcher, cfg.nproc, cfg.jobs, cfg.stage_timeout).run(stages)
    except PipelineStopped as stop:
        sys.stderr.write(f"stopped: {stop}\n")
        return 128 + stop.signum
    except (StageFailed, ValueError, FileNotFoundError) as error:
        sys.stderr.write(f"error: {error}\n")
        return 1
    if cfg.seeds == 1:
        log(f"report: {write_report(cfg, stages, out)}")
        return 0
    dirs = [seed_dir(cfg, seed) for seed in range(cfg.seeds)]
    for seed, where in enumerate(dirs):
        write_report(cfg, stages, where, seed)
    log(f"report: {write_seeds_report(cfg, dirs)}")
    return 0


def main() -> None:
    import hydra
    from hydra.core.config_store import ConfigStore

    from pipeline.config import PipelineConfig

    ConfigStore.instance().store(name="pipeline_schema", node=PipelineConfig)
    code = 0

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="pipeline")
    def entry(cfg) -> None:
        nonlocal code
        code = run(cfg)

    entry()
    sys.exit(code)


if __name__ == "__main__":
    main()
