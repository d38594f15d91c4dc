"""`python -m distill.onpolicy` end to end through the real entry point and trainer core (tiny,
CPU).

The student is a random micro model; each teacher is another random micro model with its head
scaled ×6, so its next-token distributions are much sharper than the student's near-uniform
ones and the KL starts at ~0.3 nats instead of ~1e-4 (two random micro models are both near uniform).

- Learning: eight steps of full-vocabulary reverse KL on two domains, each with its own
  teacher, lower the KL of both domains (last three steps < 0.7 × first three; measured
  0.31 → 0.17 nats on each). On-policy, so every step is measured on the student's own fresh samples.
- Resume: a run stopped after step 1 of a two-update rollout and resumed gives the losses of an
  uninterrupted one at steps 2 (the saved second mini-batch) and 3 (a fresh rollout), to 1e-5
  relative (CPU fp32 is deterministic; a changed batch moves the loss by O(0.1)).
- Two processes equal one: with the sampling scripted (tests/distill/run_distill_scripted.py,
  so all runs roll out the same samples) two gloo ranks under the deepspeed launcher, each
  with half the prompts, and the same with expert parallelism (EP=2: each rank holds half the
  experts of the student and of every teacher), log the losses of one process with all of them
  at steps 1-3. Data parallel: to 1e-4 relative (measured equal to 6 digits; the all-reduce
  adds in another order, ~1e-6 after two updates). EP: measured 3e-4 relative apart at step 1
  (before any update) and 1e-2 at step 3, so asserted to 1e-3, then 3e-2. A forward of the same
  student or teacher sharded over EP=2 equals the local one bitwise (checked by hand on these
  checkpoints, with padding), so the gap sits in the trainer's EP path and is not explained yet
  (noted on issue #16); a lost, doubled or wrongly taught micro-batch moves the loss by O(10 %).
- Bad input: a domain without a teacher, a missing teacher checkpoint, a teacher with another
  vocabulary, an unknown domain: one clear message, no traceback, before any model work.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.train._rollout_support import domain_tokenizer_file  # noqa: F401 (fixture)
from tests.train._rollout_support import micro_checkpoint

pytest.importorskip("deepspeed")

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
       "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}


def sharp_teacher(root: Path, tokenizer_file: str, seed: int, vocab_size: int = 512) -> Path:
    from model.weights import save_pretrained
    from tests.inference.conftest import build_model, micro_config

    model = build_model(micro_config(vocab_size=vocab_size, max_seq_len=256), seed)
    with torch.no_grad():
        model.head.weight.mul_(6.0)
    step = root / "checkpoints" / "step_00000001"
    save_pretrained(model, step / "model", tokenizer_file)
    return step


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, domain_tokenizer_file):  # noqa: F811
    root = tmp_path_factory.mktemp("distill")
    return {"student": micro_checkpoint(root / "student", domain_tokenizer_file),
            "strings": sharp_teacher(root / "t_strings", domain_tokenizer_file, 1),
            "arith": sharp_teacher(root / "t_arith", domain_tokenizer_file, 2),
            "wide": sharp_teacher(root / "t_wide", domain_tokenizer_file, 3, vocab_size=640)}


SCRIPTED = str(REPO / "tests" / "distill" / "run_distill_scripted.py")


def run_distill(ckpts, run_dir, *extra, launcher=(), timeout=600, teachers=None, script=None):
    teachers = teachers or {"strings": ckpts["strings"], "arith": ckpts["arith"]}
    spec = "{" + ", ".join(f"{k}: {v}" for k, v in teachers.items()) + "}"
    student = ckpts["student"]
    args = [f"init_from={student}", f"model.preset={student}/model/config.json",
            f"run_dir={run_dir}", "logging.progress=false", "logging.wandb.mode=disabled",
            f"teachers={spec}", "distill.prompts_per_step=8", "distill.group_size=2",
            "data.micro_batch=8", "distill.max_new_tokens=6", "distill.eval_n=0",
            "distill.kl_chunk=16", "checkpoint.every=100", "optim.lr=1e-2", *extra]
    if script:
        cmd = [*(launcher or [sys.executable]), script]
    else:
        cmd = [*(launcher or [sys.executable]), "--module" if launcher else "-m",
               "distill.onpolicy"]
    return subprocess.run([*cmd, *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_distillation_lowers_the_kl_to_each_teacher(ckpts, tmp_path):
    run = tmp_path / "learn"
    out = run_distill(ckpts, run, "steps=8")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    steps = [r for r in rows(run) if "kl" in r]
    assert len(steps) == 8
    for key in ("kl/strings", "kl/arith"):
        kl = [r[key] for r in steps if key in r]
        assert len(kl) >= 6 and kl[0] > 0.1, (key, kl)
        assert sum(kl[-3:]) / 3 < 0.7 * sum(kl[:3]) / 3, (key, kl)
    first = steps[0]
    assert first["routing_agreement"] > 0.99
    for key in ("time/generate", "time/teacher", "time/update", "rollout/tokens_per_s",
                "rollout/response_len_mean", "reward/mean", "grad_norm", "loss",
                "memory/loss_peak_gib"):
        assert key in first, key
    assert first["loss"] == pytest.approx(first["kl"], rel=1e-6)  # no other term by default


def test_resume_matches_the_uninterrupted_run(ckpts, tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    common = ("distill.updates=2", "checkpoint.every=1")
    out = run_distill(ckpts, whole, "steps=3", *common)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    out = run_distill(ckpts, part, "steps=1", *common)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    out = run_distill(ckpts, part, "steps=3", *common)
    assert out.returncode == 0 and "resumed from" in out.stdout, out.stdout[-3000:]
    a = {r["step"]: r["loss"] for r in rows(whole) if "loss" in r}
    b = {r["step"]: r["loss"] for r in rows(part) if "loss" in r}
    for step in (1, 2, 3):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-7), (step, a, b)


def test_two_processes_equal_one(ckpts, tmp_path):
    from tests.helpers.distributed import free_port

    common = ("steps=3", "distill.group_size=1", "distill.keep_routing=false")
    one, two = tmp_path / "one", tmp_path / "two"
    out = run_distill(ckpts, one, *common, "data.micro_batch=8", script=SCRIPTED)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    launcher = ("deepspeed", "--num_gpus", "2", "--master_port", str(free_port()))
    out = run_distill(ckpts, two, *common, "data.micro_batch=4", launcher=launcher,
                      script=SCRIPTED)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ep = tmp_path / "ep2"
    launcher = ("deepspeed", "--num_gpus", "2", "--master_port", str(free_port()))
    out = run_distill(ckpts, ep, *common, "data.micro_batch=4", "parallel.ep_size=2",
                      launcher=launcher, script=SCRIPTED)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    a = {r["step"]: r for r in rows(one) if "kl" in r}
    # measured: both within 5e-6 of one process over 3 steps (EP once differed by 3e-4 at step 1
    # and 1e-2 by step 3: untagged experts, rank 0's copied over rank 1's; tests/parallel)
    for other in (two, ep):
        b = {r["step"]: r for r in rows(other) if "kl" in r}
        assert sorted(a) == sorted(b) == [1, 2, 3]
        for step in (1, 2, 3):
            for key in ("loss", "grad_norm", "kl/strings", "kl/arith"):
                if key in a[step]:
                    assert b[step][key] == pytest.approx(a[step][key], rel=1e-4), (other, step,
                                                                                  key)
    assert a[1]["loss"] > 0.05 and a[3]["loss"] < a[1]["loss"]  # non-trivial, and learning


@pytest.mark.parametrize("extra, teachers, message", [
    (("distill.domains=[strings,arith,countdown]",), None, "'countdown' has no teacher"),
    (("distill.domains=[nope]",), None, "'nope' has no teacher"),
    ((), {"strings": "/nonexistent/teacher"}, "distill.teachers.strings=/nonexistent/teacher"),
    ((), "wide", "distill.teachers.strings"),
    (("distill.reward_coef=0.5", "distill.group_size=1"), None, "distill.reward_coef=0.5"),
])
def test_bad_input_fails_before_any_work(ckpts, tmp_path, extra, teachers, message):
    if teachers == "wide":  # a teacher with another vocabulary
        teachers = {"strings": ckpts["wide"]}
    out = run_distill(ckpts, tmp_path / "bad", "steps=1", *extra, teachers=teachers,
                      timeout=120)
    assert out.returncode != 0 and message in out.stderr + out.stdout, out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_dry_run_plans_the_teachers(tmp_path):
    """`conf=flash dry_run=true`: teachers that do not exist yet are planned with the student's
    shapes, one frozen row each."""
    out = subprocess.run([sys.executable, "-m", "distill.onpolicy", "conf=flash", "dry_run=true",
                          "world_size=64", "parallel.ep_size=64", "data.micro_batch=1",
                          "distill.prompts_per_step=64",
                          "teachers={strings: /not/yet/a, arith: /not/yet/b}",
                          f"run_dir={tmp_path}/plan"], cwd=REPO, env=ENV, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "teacher arith" in out.stdout and "teacher strings" in out.stdout, out.stdout
