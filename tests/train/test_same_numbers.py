"""The same numbers across refactors: fixed-seed pre-training, SFT, GRPO and distillation runs
(one process, fp32, CPU, through their real entry points) log the losses recorded in
`golden/same_numbers.json`.

Everything they depend on is fixed here: the tokenizer (`golden/tokenizer.json`, committed, so a
new `tokenizers` release cannot retrain it differently), a micro model initialised from a seed,
a pre-training corpus written by this test, and the domains' seeded generators. On the machine
and torch the numbers were recorded with (`fingerprint` in the file) they must agree bitwise;
elsewhere (another CPU's kernels or another torch) to 1e-4 relative, with a note of the
difference, or 1e-7 absolute: distillation's first loss is a KL of ~1e-4 between nearly equal
distributions, a difference of fp32 log-probs of order 1-10 whose rounding (~1e-7 relative,
so ~1e-6 per token, averaged over tokens) moves it by ~1e-8 on an AVX-512 CPU against the
AVX2 recording; a changed batch or model moves these losses by far more than 1e-7. Re-record after a change that is meant to move them:
`V4LAB_RECORD_GOLDEN=1 pytest tests/train/test_same_numbers.py`.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.train._rollout_support import micro_checkpoint

pytest.importorskip("deepspeed")

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).with_name("golden")
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
       "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO),
       "V4LAB_DOMAINS": "tests.rl.first_char_domain"}  # GRPO: reward variance from step 1
COMMON = ["logging.progress=false", "logging.wandb.mode=disabled", "logging.eval_every=0",
          "checkpoint.every=0", "dtype=fp32", "device=cpu", "seed=3"]


def fingerprint() -> str:
    return f"torch {torch.__version__}, {platform.machine()}, {torch.backends.cpu.get_cpu_capability()}"


def corpus(path: Path) -> Path:
    """A small deterministic text corpus (no download, no installed-package sources)."""
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota"]
    lines = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(5 + i % 9)) + f" {i}."
             for i in range(3000)]
    path.write_text("\n".join(lines) + "\n")
    return path


def run(cmd: list[str], run_dir: Path, args: list[str]) -> list[float]:
    out = subprocess.run([sys.executable, *cmd, f"run_dir={run_dir}", *COMMON, *args], cwd=REPO,
                         env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def all_losses(tmp: Path) -> dict[str, list[float]]:
    tok = str(GOLDEN / "tokenizer.json")
    student = micro_checkpoint(tmp / "student", tok, seed=0)
    teacher = micro_checkpoint(tmp / "teacher", tok, seed=1)
    init = [f"init_from={student}", f"model.preset={student}/model/config.json"]
    return {
        "pretrain": run(["train/pretrain.py"], tmp / "pretrain", [
            f"model.preset={student}/model/config.json", f"data.tokenizer={tok}",
            f"data.sources=[{{path: {corpus(tmp / 'corpus.txt')}}}]",
            f"data.cache_dir={tmp / 'cache'}", "data.seq_len=64", "data.micro_batch=2",
            "batch.global_batch=4", "steps=4", "optim.lr=3e-3", "recipe.csa_dense_until=2",
            "recipe.indexer_warmup_steps=1", "schedule.warmup_steps=1", "schedule.decay_steps=2",
            "logging.sample_tokens=0"]),
        "sft": run(["train/sft.py"], tmp / "sft", init + [
            "sft.domains=[strings]", f"data.cache_dir={tmp / 'cache'}", "data.seq_len=128",
            "data.micro_batch=4", "batch.global_batch=8", "sft.examples=64", "sft.val_examples=8",
            "sft.eval_n=0", "steps=3", "optim.lr=3e-3"]),
        "grpo": run(["-m", "rl.grpo"], tmp / "grpo", init + [
            "grpo.domains=[first_char]", "grpo.prompts_per_step=4", "grpo.group_size=8",
            "grpo.updates=2", "data.micro_batch=16", "grpo.max_new_tokens=2", "grpo.eval_n=0",
            "grpo.overlong=none", "steps=3", "optim.lr=3e-2"]),
        "distill": run(["-m", "distill.onpolicy"], tmp / "distill", init + [
            f"teachers={{strings: {teacher}}}", "distill.domains=[strings]",
            "distill.prompts_per_step=8", "distill.group_size=2", "distill.updates=2",
            "data.micro_batch=8", "distill.max_new_tokens=6", "distill.eval_n=0",
            "distill.kl_chunk=16", "steps=3", "optim.lr=1e-2"]),
    }


def test_fixed_seed_runs_log_the_recorded_losses(tmp_path):
    got = all_losses(tmp_path)
    path = GOLDEN / "same_numbers.json"
    if os.environ.get("V4LAB_RECORD_GOLDEN") == "1":
        path.write_text(json.dumps({"fingerprint": fingerprint(), "losses": got}, indent=1) + "\n")
        pytest.skip(f"recorded {path}")
    golden = json.loads(path.read_text())
    for stage, want in golden["losses"].items():
        assert len(got[stage]) == len(want), stage
        if golden["fingerprint"] == fingerprint():
            assert got[stage] == want, (stage, got[stage], want)  # bitwise
        else:
            assert got[stage] == pytest.approx(want, rel=1e-4, abs=1e-7), (
                stage, got[stage], want, golden["fingerprint"], fingerprint())
