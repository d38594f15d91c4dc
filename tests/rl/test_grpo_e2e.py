"""`python -m rl.grpo` end to end through the real entry point and trainer core (tiny, CPU).

- Learning: on the test-only `first_char` domain (a random micro model is right about half the
  time, so every group has reward variance) ten steps raise the rollouts' mean reward from
  about 0.4 to about 1. Measured with the advantage sign flipped, the same run drives it to 0
  (0.38 → 0.0), so the assertion (last three steps > first three + 0.25) fails on a sign error.
- Resume: a run stopped after step 1 of a two-update rollout and resumed gives the same losses
  at steps 2 (the saved second mini-batch) and 3 (a fresh rollout) as an uninterrupted run.
  Rollouts are seeded per (seed, rollout, rank) and CPU fp32 is deterministic, so they agree to
  rounding; 1e-5 relative is far below a changed batch (which moves the loss by O(1)).
- Two processes under the deepspeed launcher: each rank rolls out its share of the prompts and
  the rollout metrics are summed over ranks; the same with expert parallelism (EP=2) and a
  reference policy.
- Bad input: G < 2, an unknown domain, a missing `init_from`: one clear message, no traceback,
  before any model work.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.train._rollout_support import domain_tokenizer_file  # noqa: F401 (fixture)
from tests.train._rollout_support import micro_checkpoint

pytest.importorskip("deepspeed")

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
       "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
RUNNER = str(REPO / "tests" / "rl" / "run_grpo_with_test_domain.py")


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory, domain_tokenizer_file):  # noqa: F811
    return micro_checkpoint(tmp_path_factory.mktemp("grpo_base"), domain_tokenizer_file)


def run_grpo(base, run_dir, *extra, launcher=(), script=RUNNER, timeout=600):
    args = [f"init_from={base}", f"model.preset={base}/model/config.json",
            f"run_dir={run_dir}", "logging.progress=false", "logging.wandb.mode=disabled",
            "grpo.domains=[first_char]", "grpo.prompts_per_step=4", "grpo.group_size=8",
            "data.micro_batch=16", "grpo.max_new_tokens=2", "grpo.eval_n=0",
            "grpo.overlong=none", "checkpoint.every=100", "optim.lr=3e-2", *extra]
    cmd = [*(launcher or [sys.executable]), *([script] if script else [])]
    return subprocess.run([*cmd, *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_grpo_raises_the_mean_reward(base_ckpt, tmp_path):
    run = tmp_path / "learn"
    out = run_grpo(base_ckpt, run, "steps=10")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    steps = [r for r in rows(run) if "reward/mean" in r]
    rewards = [r["reward/mean"] for r in steps]
    assert len(rewards) == 10
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.25, rewards
    first = steps[0]
    assert first["mismatch_kl"] < 1e-6 and abs(first["ratio"] - 1) < 1e-4, first
    assert first["routing_agreement"] > 0.99
    for key in ("entropy", "clip_low_frac", "clip_high_frac", "opsm_masked", "kl",
                "rollout/zero_var_frac", "rollout/truncated_frac", "time/generate",
                "time/score", "time/logprob", "time/update", "rollout/tokens_per_s",
                "reward/pass@1/first_char", "grad_norm"):
        assert key in first, key
    assert (run / "reward_curve.png").stat().st_size > 0


def test_resume_matches_the_uninterrupted_run(base_ckpt, tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    common = ("grpo.updates=2", "checkpoint.every=1")
    out = run_grpo(base_ckpt, whole, "steps=3", *common)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    out = run_grpo(base_ckpt, part, "steps=1", *common)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    out = run_grpo(base_ckpt, part, "steps=3", *common)
    assert out.returncode == 0 and "resumed from" in out.stdout, out.stdout[-3000:]
    a = {r["step"]: r["loss"] for r in rows(whole) if "loss" in r}
    b = {r["step"]: r["loss"] for r in rows(part) if "loss" in r}
    for step in (1, 2, 3):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-7), (step, a, b)
    assert any(abs(v) > 1e-3 for v in a.values()), a  # non-trivial losses were compared


def test_two_processes_under_the_deepspeed_launcher(base_ckpt, tmp_path):
    from tests.helpers.distributed import free_port

    launcher = ("deepspeed", "--num_gpus", "2", "--master_port", str(free_port()))
    run = tmp_path / "ds2"
    out = run_grpo(base_ckpt, run, "steps=2", "data.micro_batch=8", launcher=launcher)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    steps = [r for r in rows(run) if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["global_batch"] == 32 for r in steps)
    # 4 prompts x 8 samples over both ranks, each with its 2 prompts: counts summed
    assert steps[0]["rollout/response_len_mean"] <= 2


def test_expert_parallel_with_a_reference(base_ckpt, tmp_path):
    """EP=2 over two ranks (each holds 2 of the 4 experts), β > 0: the rollouts' generate calls
    and the reference's forwards (loaded after the policy, sharded like it) are collectives of
    the EP group, and the run completes with the KL to the reference logged."""
    from tests.helpers.distributed import free_port

    launcher = ("deepspeed", "--num_gpus", "2", "--master_port", str(free_port()))
    run = tmp_path / "ep2"
    out = run_grpo(base_ckpt, run, "steps=2", "data.micro_batch=8", "parallel.ep_size=2",
                   "grpo.beta=0.01", "grpo.updates=2", launcher=launcher)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    steps = [r for r in rows(run) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all("kl" in r and r["kl"] >= 0 for r in steps)
    assert steps[0]["mismatch_kl"] < 1e-5


@pytest.mark.parametrize("extra, message", [
    (("grpo.group_size=1",), "grpo.group_size=1"),
    (("grpo.domains=[nope]",), "unknown domain 'nope'"),
    (("init_from=/nonexistent/ckpt", "grpo.domains=[strings]"), "/nonexistent/ckpt"),
])
def test_bad_input_fails_before_any_work(base_ckpt, tmp_path, extra, message):
    out = run_grpo(base_ckpt, tmp_path / "bad", "steps=1", *extra, timeout=120,
                   script=None, launcher=(sys.executable, "-m", "rl.grpo"))
    assert out.returncode != 0 and message in out.stderr + out.stdout, out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_dry_run_plans_the_released_shapes_with_the_reference(tmp_path):
    """`conf=flash dry_run=true`: the plan needs no weights or tokenizer, and with β > 0 it
    counts the frozen reference policy's weights per rank."""
    out = subprocess.run([sys.executable, "-m", "rl.grpo", "conf=flash", "dry_run=true",
                          "world_size=64", "parallel.ep_size=64", "grpo.beta=0.001",
                          "data.micro_batch=1", "grpo.prompts_per_step=64",
                          f"run_dir={tmp_path}/plan"], cwd=REPO, env=ENV, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "(flash)" in out.stdout and "  reference " in out.stdout
    assert "(frozen:" in out.stdout, out.stdout


def test_sigterm_during_a_rollout_stops_within_a_chunk_with_a_checkpoint(base_ckpt, tmp_path):
    """Long rollouts (16 chunks of one row, up to 120 tokens each): SIGTERM two seconds into
    the second rollout ends the run after the chunk in flight, not the rollout (which took
    `time/generate` seconds the first time), with step 1 checkpointed and exit status 143."""
    run = tmp_path / "stop"
    args = [f"init_from={base_ckpt}", f"model.preset={base_ckpt}/model/config.json",
            f"run_dir={run}", "logging.progress=false", "logging.wandb.mode=disabled",
            "grpo.domains=[first_char]", "grpo.prompts_per_step=2", "grpo.group_size=8",
            "data.micro_batch=16", "grpo.max_new_tokens=120", "grpo.rollout_batch_size=1",
            "grpo.eval_n=0", "grpo.overlong=none", "checkpoint.every=100", "steps=5"]
    proc = subprocess.Popen([sys.executable, RUNNER, *args], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 400
        while not ((run / "metrics.jsonl").exists() and
                   any("reward/mean" in r for r in rows(run))):
            assert time.time() < deadline and proc.poll() is None, proc.communicate()[0][-3000:]
            time.sleep(0.2)
        time.sleep(2)
        start = time.time()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
        elapsed = time.time() - start
    finally:
        if proc.poll() is None:
            proc.kill()
    first = next(r for r in rows(run) if "reward/mean" in r)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "stopped by signal at step 1" in out, out[-3000:]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000001"]
    assert not any(r.get("step") == 2 for r in rows(run))
    print(f"stopped {elapsed:.1f} s after the signal; a rollout took {first['time/generate']:.1f} s")
    assert elapsed < 0.5 * first["time/generate"], (elapsed, first["time/generate"])


def test_band_stop_declines_with_exit_3_and_no_checkpoint(base_ckpt, tmp_path):
    """An expert that solves none of its samples (the random micro model on `strings`):
    `grpo.band=stop` ends the run after its first rollout, before any update, with one
    `declined:` line, exit status 3, `band.json` for the pipeline, and no checkpoint."""
    run = tmp_path / "declined"
    out = run_grpo(base_ckpt, run, "steps=5", "grpo.domains=[strings]", "grpo.band=stop",
                   timeout=300)
    assert out.returncode == 3, out.stdout[-3000:] + out.stderr[-3000:]
    assert "declined: grpo: the starting model is outside the band" in out.stderr
    assert "Traceback" not in out.stderr
    band = json.loads((run / "band.json").read_text())
    assert band == {**band, "in_band": False, "side": "solves none", "varied_groups": 0.0}
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())


def test_a_verifiers_environment_for_a_few_grpo_steps(domain_tokenizer_file, tmp_path):  # noqa: F811
    """An environment written for `verifiers` (tests/helpers/vf_adder.py) as the GRPO domain:
    v4lab's policy generates, the environment's toolset and rubric act and judge, and every
    sample is scored (the random model earns nothing, so the updates are held)."""
    pytest.importorskip("verifiers.v1")
    base = micro_checkpoint(tmp_path / "base", domain_tokenizer_file, max_seq_len=1024)
    run = tmp_path / "vf"  # the V4 tools block makes the prompts ~500 tokens
    out = run_grpo(base, run, "steps=2", "grpo.domains=[vf:tests.helpers.vf_adder]",
                   "grpo.max_new_tokens=8", "grpo.eval_n=2", timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    steps = [r for r in rows(run) if "reward/mean" in r]
    assert len(steps) == 2
    for r in steps:
        assert r["reward/mean"] == 0 and "reward/pass@1/vf:tests.helpers.vf_adder" in r
        assert r["time/score"] > 0
