"""`python -m pipeline` end to end on a micro model (CPU, a few minutes): every stage through
its real entry point, the report, and a re-run.

The two domains are the test-only `first_char` / `first_char_odd` (tests/rl/first_char_domain.py,
given to every stage through $V4LAB_DOMAINS): a reply's first character must have an even / odd
code point. Their SFT data answers with a letter drawn per item, so an SFT expert is right about
half the time and GRPO has reward variance from its first rollout; the two experts then want
opposite first letters, so the student's KL to each teacher starts well above 0. Each stage's
learning signal is asserted from `report.json` (what the report's table shows): pre-training
and SFT loss fall, both experts' rollout reward rises, the KL to both teachers falls. A stage
that silently did nothing (no steps, no update) leaves a flat or missing curve and fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train._rollout_support import domain_tokenizer_file  # noqa: F401 (fixture)
from tests.train._rollout_support import micro_checkpoint

pytest.importorskip("deepspeed")

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
       "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO),
       "V4LAB_DOMAINS": "tests.rl.first_char_domain"}


def hydra_list(items) -> str:
    """A Hydra list literal of override strings (each quoted: they contain '=')."""
    return "[" + ",".join(f"'{x}'" for x in items) + "]"


def pipeline_args(out: Path, micro: Path, tokenizer: str, cache: Path) -> list[str]:
    grpo = ["grpo.prompts_per_step=4", "grpo.group_size=8", "grpo.updates=1",
            "data.micro_batch=16", "grpo.max_new_tokens=2", "grpo.eval_n=0", "grpo.overlong=none",
            "optim.name=adamw", "optim.lr=2e-2"]
    sft = ["data.seq_len=64", "data.micro_batch=4", "batch.global_batch=4", "optim.lr=3e-3",
           "sft.eval_n=0", "schedule.warmup_steps=1", "schedule.decay_steps=6"]
    domain = (f"{{sft: {{steps: 6, overrides: {hydra_list(sft)}}}, "
              f"grpo: {{steps: 10, overrides: {hydra_list(grpo)}}}}}")
    pretrain = [f"data.tokenizer={tokenizer}", f"data.cache_dir={cache}", "data.seq_len=64",
                "data.micro_batch=2", "batch.global_batch=4", "data.default_max_files=40",
                "recipe.csa_dense_until=2", "recipe.indexer_warmup_steps=1",
                "schedule.warmup_steps=1", "schedule.decay_steps=4", "logging.sample_tokens=0"]
    distill = ["distill.prompts_per_step=16", "distill.group_size=1", "data.micro_batch=16",
               "distill.max_new_tokens=2", "distill.eval_n=0", "optim.name=adamw",
               "optim.lr=3e-3", "checkpoint.every=5"]
    common = [f"model.preset={micro}/model/config.json", "logging.eval_every=0",
              "logging.wandb.mode=disabled"]
    return [f"out_dir={out}", "name=micro", "jobs=2", f"common={hydra_list(common)}",
            "pretrain.reuse=null", "pretrain.steps=8", f"pretrain.overrides={hydra_list(pretrain)}",
            "~domains", f"+domains={{first_char: {domain}, first_char_odd: {domain}}}",
            "mixed_sft.steps=6", f"mixed_sft.overrides={hydra_list(sft)}",
            "distill.steps=10", f"distill.overrides={hydra_list(distill)}",
            "eval.n=8", "eval.max_new_tokens=4", "eval.examples=1"]


def run_pipeline(args: list[str], timeout: int = 600):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def test_the_whole_recipe_learns_at_every_stage_reports_and_resumes(
        tmp_path, domain_tokenizer_file, cache_dir):  # noqa: F811
    micro = micro_checkpoint(tmp_path / "micro", domain_tokenizer_file)
    out = tmp_path / "run"
    args = pipeline_args(out, micro, domain_tokenizer_file, cache_dir)
    done = run_pipeline(args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    report = json.loads((out / "report.json").read_text())
    rows = {"base", "sft/first_char", "sft/first_char_odd", "grpo/first_char",
            "grpo/first_char_odd", "sft/mixed", "weight_average", "distill",
            "sft_more/first_char", "sft_more/first_char_odd"}
    assert set(report["scores"]) == rows
    for row, by_domain in report["scores"].items():
        assert set(by_domain) == {"first_char", "first_char_odd"}, row
        assert all(r["evaluated"] == 8 for r in by_domain.values()), row
    signals = report["signals"]
    expected = {"pretrain loss", "sft/first_char loss", "sft/first_char_odd loss",
                "sft/mixed loss", "grpo/first_char reward/mean",
                "grpo/first_char_odd reward/mean", "distill kl/first_char",
                "distill kl/first_char_odd"}
    assert set(signals) == expected
    assert all(s["learned"] for s in signals.values()), signals
    stages = report["stages"]
    for name in ("pretrain", "sft/first_char", "grpo/first_char", "sft/mixed", "distill",
                 "sft_more/first_char"):
        assert stages[name]["status"] == "ran" and stages[name]["steps"] > 0, name
    assert 0 < stages["distill"]["generate_share"] < 1
    matched = report["experts"]["first_char"]["matched"]  # GRPO's time, spent on SFT
    assert matched["extra_steps"] >= 1 and matched["grpo_seconds"] > 0
    # it continues the SFT expert's own run (optimizer state included), not a fresh one
    assert "resumed from" in (out / "logs" / "sft_more_first_char.log").read_text()
    assert report["experts"]["first_char"]["band"]["in_band"] is True
    text = (out / "report.md").read_text()
    assert "## GRPO against the same compute spent on SFT" in text
    assert "| distill |" in text and "## The student's conversations" in text
    for png in report["plots"]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert set(report["plots"]) == {"pretraining.png", "sft_loss.png", "grpo_reward.png",
                                    "distill_kl.png", "scores.png"}

    # a re-run skips every complete stage; an interrupted one resumes from its checkpoint
    shutil.rmtree(out / "distill" / "checkpoints" / "step_00000010")
    (out / "eval" / "distill.json").unlink()
    again = run_pipeline(args)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-5000:]
    started = [line.split("start ")[1].split()[0] for line in again.stdout.splitlines()
               if " start " in line]
    assert started == ["distill", "eval/distill"], again.stdout
    log = (out / "logs" / "distill.log").read_text()
    assert "resumed from" in log and "step_00000005" in log, log[-2000:]


def test_bad_config_is_one_clear_error_before_any_stage(tmp_path):
    bad = run_pipeline([f"out_dir={tmp_path}/x", "launcher=slurm", "~domains.calculator"],
                       timeout=120)
    assert bad.returncode == 2
    assert "launcher=slurm" in bad.stderr and "at least two" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "x" / "logs").exists()
