"""The recipe as a list of stages, each one of the project's entry points with its overrides.

    pretrain ─┬─ sft/<domain> ── grpo/<domain> ─┐   (one chain per domain, independent)
              │       ▲ extended   └─ sft_more/<domain>   (the same compute on SFT)
              └─ sft/mixed ─────────────────────┴─ distill ── eval/<row> ── report
                                   weight_average ──────────── eval/weight_average

The domain chains (the band check that extends an SFT expert, the compute-matched SFT) are in
`pipeline/expert_chain.py`. With `seeds=N` the whole plan is made once per pre-training seed,
in `out_dir/seed_<i>` (stage names `seed<i>/...`), and run as one graph.

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
from typing import Any, Callable, Optional, Union

MODULES = {"pretrain": "train.pretrain", "sft": "train.sft", "sft_more": "train.sft",
           "grpo": "rl.grpo",
           "distill": "distill.onpolicy", "eval": "train.evaluate"}


Arg = Union[str, Callable[[], str]]


@dataclass
class Stage:
    name: str                      # "sft/strings"
    kind: str                      # pretrain | sft | sft_more | grpo | distill | eval | average
    run_dir: Path
    argv: list[Arg] = field(default_factory=list)  # a callable is resolved at launch
    steps: Optional[int] = None    # training stages: the last step (None: set by `prepare`)
    needs: tuple[str, ...] = ()    # names of the stages it reads
    output: Optional[Path] = None  # eval/average/matched: the file that marks completion
    fn: Optional[Callable[[], Any]] = None  # in-process stages (the weight average)
    prepare: Optional[Callable[[], None]] = None  # just before launch (sets late `steps`)
    finish: Optional[Callable[[], None]] = None   # after a clean exit, before `done()`
    # a non-zero exit status -> the stages to run before trying again, or None (a failure)
    retry: Optional[Callable[[int], Optional[list["Stage"]]]] = None

    @property
    def args(self) -> list[str]:
        """The arguments as they are now: an SFT expert extended to reach GRPO's band moves
        the checkpoint that later stages read, so those paths are resolved when read."""
        return [a() if callable(a) else a for a in self.argv]

    @property
    def checkpoint(self) -> Path:
        """What the next stage reads: the last checkpoint, or the average's directory."""
        if self.steps is None:
            return self.run_dir
        return self.run_dir / "checkpoints" / f"step_{self.steps:08d}"

    def done(self) -> bool:
        if self.output is not None:
            return self.output.is_file()
        return self.steps is not None and self.checkpoint.is_dir()

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


def seed_dir(cfg: Any, seed: int) -> Path:
    """Where one seed's recipe goes: `out_dir` itself for one seed, `out_dir/seed_<i>` for more."""
    return Path(cfg.out_dir) if cfg.seeds == 1 else Path(cfg.out_dir) / f"seed_{seed}"


def build_stages(cfg: Any, average: Callable[[list[Path], Path], Any]) -> list[Stage]:
    """The whole recipe for `cfg` (`pipeline.config.PipelineConfig`), in a valid order, once
    per pre-training seed (`seeds`; stage names `seed<i>/...` when there is more than one).
    `average(checkpoints, out)` writes the experts' weight average (an in-process stage).
    Pre-training comes first in the priority order, so later seeds' bases train beside the
    first seed's chains."""
    if cfg.seeds == 1:
        return build_seed(cfg, average, 0, "")
    stages = [s for seed in range(cfg.seeds)
              for s in build_seed(cfg, average, seed, f"seed{seed}/")]
    return sorted(stages, key=lambda s: s.kind != "pretrain")  # stable: the rest keep order


def build_seed(cfg: Any, average: Callable, seed: int, prefix: str) -> list[Stage]:
    """One seed's recipe: pre-training (or the reused base, seed 0 only), an expert chain per
    domain (`pipeline/expert_chain.py`), the mixed SFT, distillation, the weight average and
    the harness on every checkpoint."""
    from .config import domain_sections
    from .expert_chain import expert_chain

    out = seed_dir(cfg, seed)
    domains = {name: {"options": dict(d.options), "weight": d.weight, "sft": d.sft,
                      "grpo": d.grpo, "band": d.band} for name, d in domain_sections(cfg)[0].items()}
    quiet = ["logging.progress=false", f"conf={cfg.conf}", *([f"seed={seed}"] if seed else []),
             *cfg.common]
    stages: list[Stage] = []

    def train(name, kind, run_dir, steps, args, overrides, needs=(), add=True):
        stage = Stage(prefix + name, kind, run_dir,
                      [f"run_dir={run_dir}", lambda: f"steps={stage.steps}", *quiet, *args,
                       *overrides], steps, tuple(needs))
        if add:
            stages.append(stage)
        return stage

    reuse = Path(cfg.pretrain.reuse) if cfg.pretrain.reuse and seed == 0 else None
    if reuse is not None and reuse.is_dir():  # the README's main job ran: start from it
        base_ckpt, base_needs = reuse, ()
    else:
        base = train("pretrain", "pretrain", out / "pretrain", cfg.pretrain.steps, [],
                     cfg.pretrain.overrides)
        base_ckpt, base_needs = base.checkpoint, (base.name,)
    rows = [("base", lambda: base_ckpt, base_needs)]
    chains = {name: expert_chain(train, out, name, d, base_ckpt, _options(domains, "sft", name),
                                 _options(domains, "grpo", name), base_needs)
              for name, d in domains.items()}
    mixed = train("sft/mixed", "sft", out / "sft_mixed", cfg.mixed_sft.steps,
                  [f"init_from={base_ckpt}", f"sft.domains={_mix(domains)}",
                   *_options(domains, "sft")], cfg.mixed_sft.overrides, base_needs)
    stages.sort(key=lambda s: s.kind == "grpo")  # the mixed SFT before any GRPO (docstring)
    experts = {name: chain.grpo for name, chain in chains.items()}
    for chain in chains.values():
        stages.append(chain.matched_sft)
        rows += chain.rows
    teachers = lambda: "teachers={" + ", ".join(  # noqa: E731 - resolved at launch
        f"{n}: {e.checkpoint}" for n, e in experts.items()) + "}"
    student = train("distill", "distill", out / "distill", cfg.distill.steps,
                    [f"init_from={mixed.checkpoint}", teachers,
                     f"distill.domains={_mix(domains)}", *_options(domains, "distill")],
                    cfg.distill.overrides, (mixed.name, *(e.name for e in experts.values())))
    avg_dir = out / "weight_average"
    stages.append(Stage(prefix + "weight_average", "average", avg_dir,
                        needs=tuple(e.name for e in experts.values()),
                        output=avg_dir / "config.json",
                        fn=lambda: average([e.checkpoint for e in experts.values()], avg_dir)))
    rows += [("sft/mixed", lambda: mixed.checkpoint, (mixed.name,)),
             ("weight_average", lambda: avg_dir, (prefix + "weight_average",)),
             ("distill", lambda: student.checkpoint, (student.name,))]
    stages += [eval_stage(cfg, out, prefix, domains, row, ckpt, needs)
               for row, ckpt, needs in rows]
    return stages


def eval_stage(cfg: Any, out: Path, prefix: str, domains: dict, row: str,
               ckpt: Callable[[], Path], needs: tuple) -> Stage:
    """The harness on `ckpt()`: every domain, greedy pass@1, the domains' own options."""
    result = eval_path(out, row)
    options = [f"options.{name}.{key}={value}" for name, d in domains.items()
               for key, value in d["options"].items()]
    args = [lambda: f"ckpt={ckpt()}", f"domains=[{','.join(domains)}]", f"n={cfg.eval.n}", "k=0",
            f"max_new_tokens={cfg.eval.max_new_tokens}", f"examples={cfg.eval.examples}",
            f"out={result}", *options, *cfg.eval.overrides]
    return Stage(f"{prefix}eval/{row}", "eval", result.parent, args, needs=needs, output=result)


def eval_path(out: Path, row: str) -> Path:
    return Path(out) / "eval" / f"{row.replace('/', '_')}.json"
