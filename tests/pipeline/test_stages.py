"""The pipeline's plan and runner without any model: the stage graph `conf/pipeline.yaml`
builds (who reads whose checkpoint, which overrides reach which stage), the config checks, and
the runner's order, skipping, failure and record, on stand-in stages that are tiny scripts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore

from pipeline.config import PipelineConfig, pipeline_problems
from pipeline.runner import Runner, StageFailed
from pipeline.stages import Stage, build_stages

CONF = str(Path(__file__).resolve().parents[2] / "conf")


def compose_cfg(*overrides: str):
    ConfigStore.instance().store(name="pipeline_schema", node=PipelineConfig)
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("pipeline", overrides=list(overrides))


def by_name(stages):
    return {s.name: s for s in stages}


def test_the_default_plan_chains_the_stages_through_their_checkpoints(tmp_path):
    cfg = compose_cfg(f"out_dir={tmp_path}/r", f"pretrain.reuse={tmp_path}/missing")
    assert pipeline_problems(cfg) == []
    stages = by_name(build_stages(cfg, lambda c, o: None))
    domains = list(cfg.domains)
    assert len(domains) >= 2 and "calculator" in domains  # the tool domain is one of them
    pre = stages["pretrain"]
    assert pre.command("python", 1)[1:3] == ["-m", "train.pretrain"]
    for d in domains:
        sft, grpo = stages[f"sft/{d}"], stages[f"grpo/{d}"]
        assert f"init_from={pre.checkpoint}" in sft.args and sft.needs == ("pretrain",)
        assert f"init_from={sft.checkpoint}" in grpo.args and grpo.needs == (sft.name,)
        assert f"grpo.domains=[{d}]" in grpo.args
        for key, value in cfg.domains[d].options.items():  # options reach every stage
            assert f"+sft.domain_options.{d}.{key}={value}" in sft.args
            assert f"+grpo.domain_options.{d}.{key}={value}" in grpo.args
            assert f"+distill.domain_options.{d}.{key}={value}" in stages["distill"].args
            assert f"options.{d}.{key}={value}" in stages["eval/distill"].args
        # the stage's own overrides come last, so they win over the derived ones
        assert grpo.args[-len(cfg.domains[d].grpo.overrides):] == list(cfg.domains[d].grpo.overrides)
    distill = stages["distill"]
    assert f"init_from={stages['sft/mixed'].checkpoint}" in distill.args
    teachers = next(a for a in distill.args if a.startswith("teachers="))
    assert all(f"{d}: {stages[f'grpo/{d}'].checkpoint}" in teachers for d in domains)
    assert set(distill.needs) == {"sft/mixed", *(f"grpo/{d}" for d in domains)}
    rows = {n[len("eval/"):] for n in stages if n.startswith("eval/")}
    assert rows == {"base", "sft/mixed", "weight_average", "distill",
                    *(f"{k}/{d}" for d in domains for k in ("sft", "grpo", "sft_more"))}
    for d in domains:  # GRPO's band check may extend the SFT expert: its row waits for GRPO
        assert stages[f"eval/sft/{d}"].needs == (f"grpo/{d}",)
        more = stages[f"sft_more/{d}"]
        assert more.needs == (f"grpo/{d}",) and f"init_from={stages[f'sft/{d}'].checkpoint}" \
            in more.args
    assert stages["eval/base"].needs == ("pretrain",)
    # priority among ready stages: the mixed SFT (on the long path to the student) before GRPO
    order = list(stages)
    assert order.index("sft/mixed") < min(order.index(f"grpo/{d}") for d in domains)
    ds = stages["distill"].command("deepspeed", 4)
    assert ds[:3] == ["deepspeed", "--num_gpus", "4"] and ds[5:7] == ["--module",
                                                                       "distill.onpolicy"]
    tr = stages["distill"].command("torchrun", 2)
    assert tr[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node", "2"]
    assert stages["eval/distill"].command("deepspeed", 4)[1:3] == ["-m", "train.evaluate"]


def test_an_existing_pretraining_checkpoint_is_reused(tmp_path):
    reuse = tmp_path / "tiny" / "checkpoints" / "step_00000100"
    reuse.mkdir(parents=True)
    cfg = compose_cfg(f"out_dir={tmp_path}/r", f"pretrain.reuse={reuse}")
    stages = by_name(build_stages(cfg, lambda c, o: None))
    assert "pretrain" not in stages
    assert f"init_from={reuse}" in stages["sft/strings"].args
    assert stages["sft/strings"].needs == () and f"ckpt={reuse}" in stages["eval/base"].args


def test_a_domain_is_added_from_the_command_line(tmp_path):
    cfg = compose_cfg(f"out_dir={tmp_path}/r", "+domains.arith={options: {difficulty: 2}}")
    assert pipeline_problems(cfg) == []
    stages = by_name(build_stages(cfg, lambda c, o: None))
    assert "+sft.domain_options.arith.difficulty=2" in stages["sft/arith"].args
    assert "grpo.domains=[arith]" in stages["grpo/arith"].args
    assert "arith: " in next(a for a in stages["distill"].args if a.startswith("teachers="))


@pytest.mark.parametrize("override, message", [
    ("launcher=slurm", "launcher=slurm: choose one of"),
    ("nproc=2", "nproc=2: launcher=python runs one process"),
    ("jobs=0", "jobs=0: must be >= 1"),
    ("distill.steps=0", "distill.steps=0: must be >= 1"),
    ("domains.strings.sft.steps=-1", "domains.strings.sft.steps=-1: must be >= 1"),
    ("+domains.strings.options.colour=red", "domains.strings: domain 'strings': bad options"),
    ("+domains.nope={weight: 1}", "domains.nope: unknown domain 'nope'"),
    ("~domains.calculator", "the recipe distils at least two"),
    ("+domains.arith={colour: 1}", "domains.arith.colour: Key 'colour' not in"),
])
def test_bad_config_is_named_before_anything_runs(override, message, tmp_path):
    cfg = compose_cfg(f"out_dir={tmp_path}/r", override)
    problems = pipeline_problems(cfg)
    assert any(message in p for p in problems), problems


class Scripted(Stage):
    """A stage whose command is a short Python snippet (the runner does not care)."""

    def __init__(self, name, run_dir, code, needs=()):
        super().__init__(name, "eval", run_dir, needs=needs, output=run_dir / f"{name}.done")
        self.code = code

    def command(self, launcher, nproc):
        return [sys.executable, "-c", self.code.replace("OUT", str(self.output))]


def test_runner_orders_skips_records_and_names_a_failure(tmp_path, capsys):
    order = tmp_path / "order.txt"
    write = ("import pathlib; p = pathlib.Path({!r}); p.write_text(p.read_text() + '{}\\n' "
             "if p.exists() else '{}\\n'); pathlib.Path('OUT').write_text('ok')")
    a = Scripted("a", tmp_path, write.format(str(order), "a", "a"))
    b = Scripted("b", tmp_path, write.format(str(order), "b", "b"), needs=("a",))
    c = Scripted("c", tmp_path, write.format(str(order), "c", "c"), needs=("a",))
    runner = Runner(tmp_path, "python", 1, 2, 60)
    runner.run([b, c, a])
    assert order.read_text().splitlines()[0] == "a"
    assert sorted(order.read_text().split()) == ["a", "b", "c"]
    record = json.loads((tmp_path / "stages.json").read_text())
    assert {k: v["status"] for k, v in record.items()} == {"a": "ran", "b": "ran", "c": "ran"}
    # a re-run skips complete stages and keeps their cost
    Runner(tmp_path, "python", 1, 2, 60).run([a, b, c])
    assert sorted(order.read_text().split()) == ["a", "b", "c"]
    assert json.loads((tmp_path / "stages.json").read_text())["a"]["seconds"] == \
        record["a"]["seconds"]
    bad = Scripted("bad", tmp_path, "import sys; print('boom: the reason'); sys.exit(3)")
    after = Scripted("after", tmp_path, "pass", needs=("bad",))
    with pytest.raises(StageFailed, match=r"(?s)stage bad failed \(exit status 3\).*bad.log"
                                          r".*boom: the reason"):
        Runner(tmp_path, "python", 1, 1, 60).run([bad, after])
    assert not after.output.exists()
    silent = Scripted("silent", tmp_path, "pass")  # exits 0 but leaves nothing
    with pytest.raises(StageFailed, match="stage silent exited cleanly but left no"):
        Runner(tmp_path, "python", 1, 1, 60).run([silent])
    slow = Scripted("slow", tmp_path, "import time; time.sleep(30)")
    with pytest.raises(StageFailed, match="ran past stage_timeout=1s"):
        Runner(tmp_path, "python", 1, 1, 1).run([slow])
    with pytest.raises(ValueError, match="stage x needs \\['y'\\]"):
        Runner(tmp_path, "python", 1, 1, 1).run([Scripted("x", tmp_path, "pass", needs=("y",))])


def test_grpo_outside_the_band_extends_its_sft_expert_then_runs(tmp_path):
    """The plan's retry, on the real stage objects: GRPO runs with grpo.band=stop while the
    extension budget lasts; its exit status 3 makes the runner train the SFT expert further
    (a larger `steps`, recorded for re-runs) and try again; the last try runs with
    grpo.band=warn. Any other failure is not retried."""
    from pipeline.expert_chain import extensions_done

    cfg = compose_cfg(f"out_dir={tmp_path}/r", f"pretrain.reuse={tmp_path}/missing",
                      "domains.calculator.band.max_extensions=2",
                      "domains.calculator.band.extend_steps=7")
    stages = by_name(build_stages(cfg, lambda c, o: None))
    sft, grpo = stages["sft/calculator"], stages["grpo/calculator"]
    base = cfg.domains.calculator.sft.steps
    assert "grpo.band=stop" in grpo.args and f"steps={base}" in sft.args
    assert grpo.retry(1) is None  # a crash is a failure, not a reason to train more
    assert grpo.retry(3) == [sft]
    assert sft.steps == base + 7 and f"steps={base + 7}" in sft.args
    assert f"init_from={sft.checkpoint}" in grpo.args and sft.checkpoint.name.endswith(
        f"{base + 7:08d}")
    assert extensions_done(sft.run_dir) == 1 and "grpo.band=stop" in grpo.args
    assert grpo.retry(3) == [sft] and sft.steps == base + 14
    assert "grpo.band=warn" in grpo.args and grpo.retry(3) is None  # the budget is spent
    # a re-run plans the extended expert
    again = by_name(build_stages(cfg, lambda c, o: None))
    assert again["sft/calculator"].steps == base + 14
    assert f"ckpt={sft.checkpoint}" in again["eval/sft/calculator"].args


def test_the_runner_runs_a_retry_stage_then_the_stage_again(tmp_path):
    tries = tmp_path / "tries"
    first = Scripted("grpo", tmp_path,
                     f"import pathlib, sys; p = pathlib.Path({str(tries)!r}); n = len(p.read_text())"
                     f" if p.exists() else 0; p.write_text('x' * (n + 1)); "
                     f"sys.exit(3) if n == 0 else pathlib.Path('OUT').write_text('ok')")
    extended = Scripted("sft", tmp_path, "import pathlib; pathlib.Path('OUT').write_text('ok')")
    first.retry = lambda code: [extended] if code == 3 else None
    Runner(tmp_path, "python", 1, 1, 60).run([first])
    assert tries.read_text() == "xx" and extended.output.is_file()
    record = json.loads((tmp_path / "stages.json").read_text())
    assert record["sft"]["extensions"] == 1 and record["grpo"]["status"] == "ran"


def test_the_compute_matched_sft_takes_grpo_training_time_over_sft_step_time(tmp_path):
    cfg = compose_cfg(f"out_dir={tmp_path}/r", f"pretrain.reuse={tmp_path}/missing")
    stages = by_name(build_stages(cfg, lambda c, o: None))
    sft, grpo, more = (stages[f"{k}/strings"] for k in ("sft", "grpo", "sft_more"))
    for run, rows in ((sft.run_dir, [(1, 2.0, 1e-3), (2, 3.0, 5e-4), (3, 2.5, 2e-4)]),
                      (grpo.run_dir, [(1, 20.0, 3e-5), (2, 10.0, 3e-5)])):
        run.mkdir(parents=True)
        (run / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "step_seconds": t, "lr": lr}) + "\n" for s, t, lr in rows))
    expert = sft.checkpoint  # the SFT run's last checkpoint: what the continuation copies
    (expert / "model").mkdir(parents=True)
    (expert / "manifest.json").write_text("{}")
    assert more.steps is None and not more.done()
    more.prepare()  # 30 s of GRPO / 2.5 s per SFT step = 12 more steps, at the last SFT lr
    total = sft.steps + 12
    assert more.steps == total and f"steps={total}" in more.args
    assert "optim.lr=0.0002" in more.args
    assert more.args[-2:] == ["schedule.warmup_steps=0", "schedule.decay_steps=0"]
    copied = more.run_dir / "checkpoints" / expert.name  # resumed: the SFT's optimizer state
    assert (copied / "manifest.json").is_file() and (copied / "model").is_dir()
    more.finish()
    record = json.loads((more.run_dir / "matched.json").read_text())
    assert more.done() and record["steps"] == total and record["extra_steps"] == 12
    assert by_name(build_stages(cfg, lambda c, o: None))["sft_more/strings"].steps == total


def test_seeds_plan_one_recipe_per_pretraining_seed(tmp_path):
    reuse = tmp_path / "tiny" / "checkpoints" / "step_00000100"
    reuse.mkdir(parents=True)
    cfg = compose_cfg(f"out_dir={tmp_path}/r", f"pretrain.reuse={reuse}", "seeds=3")
    assert pipeline_problems(cfg) == []
    stages = by_name(build_stages(cfg, lambda c, o: None))
    assert "seed0/pretrain" not in stages  # seed 0 reuses the README's base
    assert [n for n in stages if n.endswith("pretrain")] == ["seed1/pretrain", "seed2/pretrain"]
    assert list(stages)[:2] == ["seed1/pretrain", "seed2/pretrain"]  # started first
    for seed in (1, 2):
        pre = stages[f"seed{seed}/pretrain"]
        assert f"seed={seed}" in pre.args and pre.run_dir == tmp_path / "r" / f"seed_{seed}" / \
            "pretrain"
        assert f"init_from={pre.checkpoint}" in stages[f"seed{seed}/sft/strings"].args
        assert f"seed={seed}" in stages[f"seed{seed}/distill"].args
    assert f"init_from={reuse}" in stages["seed0/sft/strings"].args
    assert not any(a.startswith("seed=") for a in stages["seed0/sft/strings"].args)
    assert stages["seed2/eval/distill"].output == tmp_path / "r" / "seed_2" / "eval" / \
        "distill.json"
    for s in stages.values():  # every stage's inputs are in the plan
        assert all(n in stages for n in s.needs)
