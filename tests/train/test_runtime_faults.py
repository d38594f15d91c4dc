"""The trainer under faults, end to end in real processes (tiny settings of the e2e tests):
resume with a batch-size ramp and a sequence-length stage is the same run, SIGTERM to the
`deepspeed` runner stops its ranks with a checkpoint, garbage weights or a non-finite first
step stop with a clear message, and a full disk during a save surfaces as itself."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.train.test_pretrain_e2e import ENV, FAST, REPO, _port, losses, run

# 2 → 8 sequences over 2560 tokens (steps of 256-512 tokens): the batch grows at step 5, after
# the resume point; the sequence stage at step 3 makes the resume land on a stage boundary
RAMP = ["steps=6", "checkpoint.every=0", "batch.ramp_start=2", "batch.global_batch=8",
        "batch.ramp_tokens=2560", "recipe.seq_len_stages=[{step:3,seq_len:64}]",
        "batch.per_stage=sequences"]  # the sequence count, not the tokens, kept across stages


def rows(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def test_resume_with_batch_ramp_and_seq_stage_is_the_same_run(tmp_path, cache_dir):
    full = tmp_path / "full"
    run(RAMP, full, cache_dir)
    batch = {r["step"]: r["global_batch"] for r in rows(full)}
    assert batch == {1: 2, 2: 2, 3: 2, 4: 2, 5: 4, 6: 4}, batch  # the ramp happens
    cut = tmp_path / "cut"
    out = run(RAMP, cut, cache_dir, env={**ENV, "V4LAB_FAULT_SIGTERM_STEP": "3"}, check=False)
    assert "stopped by signal at step 3" in out.stdout + out.stderr
    assert out.returncode == 128 + signal.SIGTERM  # a preempted job is not a finished one
    assert [p.name for p in (cut / "checkpoints").iterdir()] == ["step_00000003"]
    out = run(RAMP, cut, cache_dir)
    assert "resumed from" in out.stdout
    resumed = rows(cut)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    expect = {r["step"]: r for r in rows(full)}
    for r in resumed:  # one process, same layout: bitwise, as in the e2e resume test
        want = expect[r["step"]]
        assert (r["loss"], r["global_batch"], r["tokens_seen"], r["seq_len"]) == \
            (want["loss"], want["global_batch"], want["tokens_seen"], want["seq_len"]), r["step"]


def _tree(pid):
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_sigterm_to_deepspeed_runner_stops_its_ranks_with_a_checkpoint(tmp_path, cache_dir):
    """Only the runner gets the signal (as from `kill <pid>`); without a watch the ranks,
    whose parent `deepspeed.launcher.launch` survives, would train on with no checkpoint."""
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(_port()), "train/pretrain.py",
           *FAST, "steps=1000", "checkpoint.every=0", f"run_dir={tmp_path}",
           f"data.cache_dir={cache_dir}"]
    log = open(tmp_path / "launcher.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    descendants = []
    try:
        metrics = tmp_path / "metrics.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline and not (metrics.exists() and len(losses(tmp_path)) >= 1):
            assert proc.poll() is None, (tmp_path / "launcher.log").read_text()[-3000:]
            time.sleep(0.5)
        descendants = _tree(proc.pid)
        assert len(descendants) >= 3, descendants  # launch + 2 ranks
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)  # reaped, as a shell would
        gone, alive = psutil.wait_procs(descendants, timeout=120)
        assert not alive, f"ranks still running: {alive}"
    finally:
        for p in [*descendants, *_tree(proc.pid)]:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        log.close()
    text = (tmp_path / "launcher.log").read_text()
    assert "stopping as on SIGTERM" in text, text[-3000:]
    saved = sorted((tmp_path / "checkpoints").glob("step_*"))
    assert len(saved) == 1 and not saved[0].name.endswith(".tmp"), saved
    names = {p.name for p in saved[0].iterdir()}
    assert {"model", "trainer_rank0.pt", "trainer_rank1.pt", "optimizer_rank0.pt",
            "optimizer_rank1.pt"} <= names
    step = int(saved[0].name.split("_")[1])
    assert step >= 1
    for r in range(2):
        state = torch.load(saved[0] / f"trainer_rank{r}.pt", weights_only=False)
        assert state["step"] == step and state["world"] == 2
    run([f"steps={step + 1}", "checkpoint.every=0"], tmp_path, cache_dir, "deepspeed2",
        timeout=300)  # and it resumes
    assert max(losses(tmp_path)) == step + 1


def test_nan_weights_in_checkpoint_stop_naming_the_tensor(tmp_path, cache_dir):
    run(["steps=1"], tmp_path, cache_dir)
    weights_file = tmp_path / "checkpoints" / "step_00000001" / "model" / "model.safetensors"
    weights = load_file(str(weights_file))
    name = "layers.1.attn.wq_a.weight"  # one tensor deep in the model
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, str(weights_file), metadata={"format": "pt"})
    out = run(["steps=3"], tmp_path, cache_dir, check=False)
    text = out.stdout + out.stderr
    assert out.returncode != 0, text[-3000:]
    assert "non-finite weights" in text and name in text, text[-3000:]
    assert max(losses(tmp_path)) == 1  # no step trained on the garbage


def test_non_finite_first_step_stops(tmp_path, cache_dir):
    env = {**ENV, "V4LAB_FAULT_NAN_STEPS": "1"}
    out = run(["steps=3"], tmp_path, cache_dir, env=env, check=False)
    text = out.stdout + out.stderr
    assert out.returncode != 0, text[-3000:]
    assert "first loss or gradient of this run (step 1) is non-finite" in text, text[-3000:]
    assert not (tmp_path / "checkpoints").exists() or not any(
        (tmp_path / "checkpoints").glob("step_*"))


def test_disk_full_during_save_surfaces_with_free_space(tmp_path, cache_dir):
    env = {**ENV, "V4LAB_FAULT_DISK_FULL": "1"}  # the save and the plot both hit ENOSPC
    out = run(["steps=1"], tmp_path, cache_dir, env=env, check=False)
    assert out.returncode != 0
    err = out.stderr.strip().splitlines()
    final = [line for line in err if line.startswith(("OSError", "RuntimeError"))][-1]
    assert "No space left on device" in final and "GiB free" in final, final
    assert str(tmp_path / "checkpoints" / "step_00000001") in final, final
    assert "loss_curve.png not written" in out.stdout + out.stderr
    pngs = list(tmp_path.glob("*loss_curve.png*"))
    assert all(p.stat().st_size > 0 for p in pngs) and not any(
        p.name.endswith(".tmp") for p in pngs), pngs
    assert os.path.getsize(tmp_path / "metrics.jsonl") > 0  # the metrics still closed cleanly


def test_kill9_then_resume_leaves_each_step_once_in_the_metrics(tmp_path, cache_dir):
    """kill -9 after the step-2 checkpoint, then resume: the killed run's rows past step 2 move
    to metrics.superseded.jsonl (marked), so metrics.jsonl holds every step once, in order."""
    cmd = [sys.executable, "train/pretrain.py", *FAST, "steps=1000", "checkpoint.every=2",
           f"run_dir={tmp_path}", f"data.cache_dir={cache_dir}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (
                (tmp_path / "metrics.jsonl").exists() and len(rows(tmp_path)) >= 3
                and (tmp_path / "checkpoints" / "step_00000002").is_dir()):
            assert proc.poll() is None
            time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()
    killed_at = max(r["step"] for r in rows(tmp_path))
    saved = max(int(p.name.split("_")[1]) for p in (tmp_path / "checkpoints").glob("step_*")
                if not p.name.endswith(".tmp"))
    assert killed_at > saved  # rows past the checkpoint exist: the case under test
    run(["steps=5", "checkpoint.every=2"], tmp_path, cache_dir)
    assert [r["step"] for r in rows(tmp_path)] == [1, 2, 3, 4, 5]
    superseded = [json.loads(x) for x in
                  (tmp_path / "metrics.superseded.jsonl").read_text().splitlines()]
    assert {r["superseded_at_resume"] for r in superseded} == {saved}
    assert {r["step"] for r in superseded if "loss" in r} == set(range(saved + 1, killed_at + 1))
