"""The recipe as a list of stages, each one of the project's entry points with its overrides.

    pretrain ─┬─ sft/<domain> ── grpo/<domain> ─┐   (one chain per domain, independent)
              └─ sft/mixed ─────────────────────┴─ distill ── eval/<row> ── report
                                   weight_average ──────────── eval/weight_average

A training stage is complete when its last checkpoint (`checkpoints/step_<steps>`) exists;
checkpoints are written atomically, so a half-written one never counts. An incomplete stage
is simply started again: its entry point resumes from the newest checkpoint in its run
directory (`checkpoint.resume=auto`). Evaluation results and the weight average are complete
when their file exists (both are written atomically).

The list is also the runner's priority among ready stages: every expert's SFT, then the mixed
SFT, then the GRPO stages. The mixed SFT is the longest stage on the way to the student
(mixed SFT, then distillation), so it takes the first free slot and the GRPO stages fill the
other one beside it.
"""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

MODULES = {"pretrain": "train.pretrain", "sft": "train.sft", "grpo": "rl.grpo",
           "distill": "distill.onpolicy", "eval": "train.evaluate"}


@dataclass
class Stage:
    name: str                      # "sft/strings"
    kind: str                      # pretrain | sft | grpo | distill | eval | average
    run_dir: Path
    args: list[str] = field(default_factory=list)
    steps: Optional[int] = None    # training stages: the last step
    needs: tuple[str, ...] = ()    # names of the stages it reads
    output: Optional[Path] = None  # eval/average: the file that marks completion
    fn: Optional[Callable[[], Any]] = None  # in-process stages (the weight average)

    @property
    def checkpoint(self) -> Path:
        """What the next stage reads: the last checkpoint, or the average's directory."""
        if self.steps is None:
            return self.run_dir
        return self.run_dir / "checkpoints" / f"step_{self.steps:08d}"

    def done(self) -> bool:
        if self.output is not None:
            return self.output.is_file()
        return self.checkpoint.is_dir()

    def command(self, launcher: str, nproc: int) -> list[str]:
        """The stage's command line; only training stages go through a distributed launcher."""
        module = MODULES[self.kind]
        if self.kind == "eval" or launcher == "python":
            return [sys.executable, "-m", module, *self.args]
        port = str(free_port())
        if launcher == "deepspeed":
            return ["deepspeed", "--num_gpus", str(nproc), "--master_port", port,
                    "--module", module, *self.args]
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", port, "-m", module, *self.args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _options(domains: dict, section: str, only: Optional[str] = None) -> list[str]:
    """Domain options as a stage's overrides: `+<section>.domain_options.<d>.<k>=v`."""
    return [f"+{section}.domain_options.{name}.{key}={value}"
            for name, d in domains.items() if only in (None, name)
            for key, value in d["options"].items()]


def _mix(domains: dict) -> str:
    return "[" + ",".join(f"{name}:{d['weight']:g}" for name, d in domains.items()) + "]"


def build_stages(cfg: Any, average: Callable[[list[Path], Path], Any]) -> list[Stage]:
    """The whole recipe for `cfg` (`pipeline.config.PipelineConfig`), in a valid order.
    `average(checkpoints, out)` writes the experts' weight average (an in-process stage)."""
    from .config import domain_sections

    out = Path(cfg.out_dir)
    domains = {name: {"options": dict(d.options), "weight": d.weight, "sft": d.sft,
                      "grpo": d.grpo} for name, d in domain_sections(cfg)[0].items()}
    quiet = ["logging.progress=false", f"conf={cfg.conf}", *cfg.common]
    stages: list[Stage] = []

    def train(name, kind, run_dir, steps, args, overrides, needs=()):
        stage = Stage(name, kind, run_dir, [f"run_dir={run_dir}", f"steps={steps}", *quiet,
                                            *args, *overrides], steps, tuple(needs))
        stages.append(stage)
        return stage

    reuse = Path(cfg.pretrain.reuse) if cfg.pretrain.reuse else None
    if reuse is not None and reuse.is_dir():  # the README's main job ran: start from it
        base_ckpt, base_needs = reuse, ()
    else:
        base = train("pretrain", "pretrain", out / "pretrain", cfg.pretrain.steps, [],
                     cfg.pretrain.overrides)
        base_ckpt, base_needs = base.checkpoint, (base.name,)
    rows = [("base", base_ckpt, base_needs)]
    sfts = {name: train(f"sft/{name}", "sft", out / f"sft_{name}", d["sft"].steps,
                        [f"init_from={base_ckpt}", f"sft.domains=[{name}]",
                         *_options(domains, "sft", name)], d["sft"].overrides, base_needs)
            for name, d in domains.items()}
    mixed = train("sft/mixed", "sft", out / "sft_mixed", cfg.mixed_sft.steps,
                  [f"init_from={base_ckpt}", f"sft.domains={_mix(domains)}",
                   *_options(domains, "sft")], cfg.mixed_sft.overrides, base_needs)
    experts = {}
    for name, d in domains.items():
        sft = sfts[name]
        grpo = train(f"grpo/{name}", "grpo", out / f"grpo_{name}", d["grpo"].steps,
                     [f"init_from={sft.checkpoint}", f"grpo.domains=[{name}]",
                      *_options(domains, "grpo", name)], d["grpo"].overrides, (sft.name,))
        experts[name] = grpo
        rows += [(sft.name, sft.checkpoint, (sft.name,)),
                 (grpo.name, grpo.checkpoint, (grpo.name,))]
    teachers = "{" + ", ".join(f"{n}: {e.checkpoint}" for n, e in experts.items()) + "}"
    student = train("distill", "distill", out / "distill", cfg.distill.steps,
                    [f"init_from={mixed.checkpoint}", f"teachers={teachers}",
                     f"distill.domains={_mix(domains)}", *_options(domains, "distill")],
                    cfg.distill.overrides, (mixed.name, *(e.name for e in experts.values())))
    avg_dir = out / "weight_average"
    expert_ckpts = [e.checkpoint for e in experts.values()]
    stages.append(Stage("weight_average", "average", avg_dir,
                        needs=tuple(e.name for e in experts.values()),
                        output=avg_dir / "config.json",
                        fn=lambda: average(expert_ckpts, avg_dir)))
    rows += [(mixed.name, mixed.checkpoint, (mixed.name,)),
             ("weight_average", avg_dir, ("weight_average",)),
             (student.name, student.checkpoint, (student.name,))]
    stages += [eval_stage(cfg, domains, row, ckpt, needs) for row, ckpt, needs in rows]
    return stages


def eval_stage(cfg: Any, domains: dict, row: str, ckpt: Path, needs: tuple) -> Stage:
    """The harness on `ckpt`: every domain, greedy pass@1, the domains' own options."""
    result = eval_path(cfg, row)
    options = [f"options.{name}.{key}={value}" for name, d in domains.items()
               for key, value in d["options"].items()]
    args = [f"ckpt={ckpt}", f"domains=[{','.join(domains)}]", f"n={cfg.eval.n}", "k=0",
            f"max_new_tokens={cfg.eval.max_new_tokens}", f"examples={cfg.eval.examples}",
            f"out={result}", *options, *cfg.eval.overrides]
    return Stage(f"eval/{row}", "eval", result.parent, args, needs=needs, output=result)


def eval_path(cfg: Any, row: str) -> Path:
    return Path(cfg.out_dir) / "eval" / f"{row.replace('/', '_')}.json"
