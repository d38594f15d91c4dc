"""Launcher configuration: Hydra schema errors, DeepSpeed's argv, dry-run plans, recipe phases."""

import subprocess
import sys
from pathlib import Path

import pytest

from model.config import get_config
from train.config import RecipeSection, SeqStage
from train.dist import strip_launcher_args
from train.plan import make_plan
from train.recipe import phase_at, validate_recipe

REPO = Path(__file__).resolve().parents[2]


def launch(*overrides, timeout=120):
    return subprocess.run([sys.executable, "train/pretrain.py", *overrides], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("name,world,ep,total,active", [
    ("flash", 64, 8, "284.33B total", "13.27B activated"),
    ("pro", 128, 16, "1573.00B total", "48.85B activated"),
])
def test_dry_run_plans_released_presets(name, world, ep, total, active, tmp_path):
    out = launch("dry_run=true", f"conf={name}", f"world_size={world}",
                 f"parallel.ep_size={ep}", f"run_dir={tmp_path}")
    assert out.returncode == 0, out.stderr
    assert total in out.stdout and active in out.stdout
    assert f"expert-parallel {ep}" in out.stdout and "optimizer" in out.stdout


@pytest.mark.parametrize("override,message", [
    ("stepz=3", "stepz"),
    ("steps=many", "steps"),
    ("conf=huge", "conf"),
    ("model.preset=huge", "unknown model preset 'huge'"),
    ("optim.lr=fast", "lr"),
])
def test_config_errors_fail_fast(override, message, tmp_path):
    out = launch("dry_run=true", override, f"run_dir={tmp_path}")
    assert out.returncode != 0
    assert message in out.stderr + out.stdout


def test_deepspeed_local_rank_is_stripped(monkeypatch):
    import os
    monkeypatch.setenv("LOCAL_RANK", "0")  # recorded, so the value set below is undone after
    monkeypatch.delenv("LOCAL_RANK")
    assert strip_launcher_args(["--local_rank=3", "steps=2"]) == ["steps=2"]
    assert os.environ["LOCAL_RANK"] == "3"
    assert strip_launcher_args(["steps=2", "--local_rank", "1"]) == ["steps=2"]


def test_plan_rejects_bad_parallel_shapes():
    cfg = get_config("tiny")
    with pytest.raises(ValueError, match="ep_size=3"):
        make_plan(cfg, 4, 3, 1, 64, 8, False, "off")
    with pytest.raises(ValueError, match="global_batch=6"):
        make_plan(cfg, 4, 1, 1, 64, 6, False, "off")
    small = make_plan(cfg, 2, 2, 1, 64, 8, False, "off")
    big = make_plan(cfg, 2, 1, 1, 64, 8, False, "off")
    assert small.params_per_rank < big.params_per_rank  # experts split over EP ranks
    assert make_plan(cfg, 1, 1, 4, 256, 8, False, "block").activations < \
        make_plan(cfg, 1, 1, 4, 256, 8, False, "off").activations


def test_recipe_phases():
    r = RecipeSection(csa_dense_until=10, indexer_warmup_steps=5, mtp_weight=0.3,
                      mtp_weight_after_decay=0.1,
                      seq_len_stages=[SeqStage(0, 128), SeqStage(20, 256)])
    p = phase_at(0, r, decay_start=30, base_seq_len=64)
    assert (p.csa_mode, p.indexer_loss, p.indexer_only, p.mtp_weight, p.seq_len) == \
        ("dense", False, False, 0.3, 128)
    p = phase_at(12, r, 30, 64)
    assert (p.csa_mode, p.indexer_loss, p.indexer_only) == ("dense", True, True)
    p = phase_at(25, r, 30, 64)
    assert (p.csa_mode, p.indexer_only, p.seq_len, p.mtp_weight) == ("sparse", False, 256, 0.3)
    assert phase_at(30, r, 30, 64).mtp_weight == 0.1
    with pytest.raises(ValueError, match="ascending"):
        validate_recipe(RecipeSection(seq_len_stages=[SeqStage(5, 128), SeqStage(1, 256)]))
