"""Checkpoint management under faults, in-process on a small model (one rank, no process group):
pruning never deletes what the run just wrote, resuming from an older step sets the later
checkpoints aside instead of deleting or following them, a kill mid-prune leaves no
complete-looking half-deleted directory, `resume=auto` skips an incomplete newest checkpoint,
and each kind of unusable checkpoint (truncated or missing file, another model, another layout)
gets one message naming the file and the way out.

The launcher-level versions of the same cases run in real processes at the end (tiny preset,
a few steps)."""

import json
import re
import shutil
import time
from pathlib import Path

import pytest
import torch

from tests.parallel.harness import small_config
from tests.train.test_pretrain_e2e import run
from train import checkpoint as ckpt
from train.checkpoint import CheckpointError
from train.dist import DistInfo

INFO = DistInfo(0, 1, 0, torch.device("cpu"))


@pytest.fixture(scope="module")
def model():
    from model.transformer import Transformer

    torch.manual_seed(0)
    m = Transformer(small_config())
    return m, torch.optim.AdamW(m.parameters(), lr=1e-3)


def save(run_dir, step, model, keep=0, info=INFO):
    m, opt = model
    return ckpt.save_checkpoint(run_dir, step, info, m, opt, {"step": step}, "", None, keep)


def steps(run_dir):
    return [ckpt.step_of(p) for p in ckpt.list_checkpoints(run_dir)]


def truncate(file: Path, keep_fraction=0.5):
    data = file.read_bytes()
    file.write_bytes(data[:int(len(data) * keep_fraction)])


# ---------------------------------------------------------------------- pruning and branches
def test_pruning_never_deletes_what_was_just_written(tmp_path, model):
    for s in range(1, 7):
        save(tmp_path, s, model)
    save(tmp_path, 4, model, keep=2)  # a later step (6) exists: it must not win over step 4
    assert steps(tmp_path) == [3, 4, 5, 6]
    save(tmp_path, 5, model, keep=1)
    assert steps(tmp_path) == [5, 6]


def test_resume_from_older_step_sets_later_checkpoints_aside(tmp_path, model, capsys):
    for s in range(1, 7):
        save(tmp_path, s, model)
    older = ckpt.checkpoint_root(tmp_path) / "step_00000002"
    assert ckpt.start_point(str(older), tmp_path, INFO) == older
    assert steps(tmp_path) == [1, 2]
    aside = list(ckpt.checkpoint_root(tmp_path).glob("abandoned_*"))
    assert len(aside) == 1
    assert sorted(p.name for p in aside[0].iterdir()) == [
        "REASON.txt", "step_00000003", "step_00000004", "step_00000005", "step_00000006"]
    assert "step_00000002" in (aside[0] / "REASON.txt").read_text()
    err = capsys.readouterr().err
    assert "moved 4 later checkpoint(s)" in err and str(aside[0]) in err
    # the new branch: pruning with keep=1 keeps its own newest, resume=auto continues it
    save(tmp_path, 3, model, keep=1)
    save(tmp_path, 4, model, keep=1)
    assert steps(tmp_path) == [4]
    assert ckpt.resolve_resume("auto", tmp_path).name == "step_00000004"
    assert ckpt.checkpoint_problem(aside[0] / "step_00000006") is None  # kept intact


def test_fresh_start_in_a_used_run_dir_sets_everything_aside(tmp_path, model):
    for s in (1, 2):
        save(tmp_path, s, model)
    assert ckpt.start_point("none", tmp_path, INFO) is None
    assert steps(tmp_path) == []
    (aside,) = ckpt.checkpoint_root(tmp_path).glob("abandoned_*")
    assert sorted(p.name for p in aside.glob("step_*")) == ["step_00000001", "step_00000002"]
    assert ckpt.start_point("auto", tmp_path, INFO) is None  # nothing to follow any more


def test_resume_auto_from_the_newest_moves_nothing(tmp_path, model):
    for s in (1, 2):
        save(tmp_path, s, model)
    assert ckpt.start_point("auto", tmp_path, INFO).name == "step_00000002"
    assert steps(tmp_path) == [1, 2]
    assert not list(ckpt.checkpoint_root(tmp_path).glob("abandoned_*"))


class Killed(BaseException):
    pass


def dies_halfway(path, *args, **kwargs):
    """shutil.rmtree killed mid-way: the weights are gone, the rest is still there."""
    (Path(path) / "model" / "model.safetensors").unlink()
    raise Killed


def test_kill_mid_prune_leaves_no_complete_looking_half_deleted_dir(tmp_path, model,
                                                                     monkeypatch):
    for s in (1, 2):
        save(tmp_path, s, model)
    real_rmtree = shutil.rmtree
    monkeypatch.setattr(ckpt.shutil, "rmtree", dies_halfway)
    with pytest.raises(Killed):
        save(tmp_path, 3, model, keep=2)  # prunes step 1
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    root = ckpt.checkpoint_root(tmp_path)
    assert steps(tmp_path) == [2, 3]
    for p in ckpt.list_checkpoints(tmp_path):
        assert ckpt.checkpoint_problem(p) is None, p  # every complete-looking name is complete
    assert (root / "step_00000001.deleting").is_dir()
    ckpt.clean_partial(tmp_path, INFO)  # start-up removes the leftover
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002", "step_00000003"]


def test_resaving_a_step_never_exposes_a_partial_directory(tmp_path, model, monkeypatch):
    save(tmp_path, 1, model)
    real_rmtree = shutil.rmtree
    monkeypatch.setattr(ckpt.shutil, "rmtree", dies_halfway)
    with pytest.raises(Killed):
        save(tmp_path, 1, model)  # re-saving step 1 (a signal right after a save)
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    assert [ckpt.checkpoint_problem(p) for p in ckpt.list_checkpoints(tmp_path)] == [None]


# ---------------------------------------------------------------------- unusable checkpoints
@pytest.mark.parametrize("rel", ["model/model.safetensors", "optimizer_rank0.pt",
                                 "trainer_rank0.pt"])
def test_resume_auto_skips_a_truncated_newest_checkpoint(tmp_path, model, rel):
    for s in (1, 2, 3):
        save(tmp_path, s, model)
    bad = ckpt.checkpoint_root(tmp_path) / "step_00000003"
    truncate(bad / rel)
    warnings = []
    assert ckpt.resolve_resume("auto", tmp_path, warn=warnings.append).name == "step_00000002"
    assert len(warnings) == 1 and "step_00000003" in warnings[0] and rel in warnings[0]
    with pytest.raises(CheckpointError, match=re.escape(str(bad / rel))):
        ckpt.resolve_resume(str(bad), tmp_path)  # an explicit path: a clear error, no fallback


def test_truncated_weights_without_manifest_are_detected_and_named(tmp_path, model):
    """Checkpoints written before manifests existed: the safetensors header tells."""
    save(tmp_path, 1, model)
    path = ckpt.list_checkpoints(tmp_path)[0]
    (path / ckpt.MANIFEST).unlink()
    weights = path / "model" / "model.safetensors"
    truncate(weights, 0.9)
    problem = ckpt.checkpoint_problem(path)
    assert str(weights) in problem and "truncated" in problem
    m, _ = model
    with pytest.raises(CheckpointError, match=re.escape(str(weights))):
        ckpt.load_weights(path / "model", m, "cpu")  # not a bare SafetensorError
    truncate(weights, 0.001)  # even the header is cut
    assert "header" in ckpt.checkpoint_problem(path)


def test_truncated_optimizer_state_at_load_names_the_file(tmp_path, model):
    save(tmp_path, 1, model)
    path = ckpt.list_checkpoints(tmp_path)[0]
    (path / ckpt.MANIFEST).unlink()
    truncate(path / "optimizer_rank0.pt")
    m, opt = model
    with pytest.raises(CheckpointError, match=re.escape(str(path / "optimizer_rank0.pt"))):
        ckpt.load_checkpoint(path, INFO, m, opt)


def test_no_usable_checkpoint_is_an_error_not_a_silent_fresh_start(tmp_path, model):
    save(tmp_path, 1, model)
    truncate(ckpt.list_checkpoints(tmp_path)[0] / "model" / "model.safetensors")
    with pytest.raises(CheckpointError, match="checkpoint.resume=none"):
        ckpt.resolve_resume("auto", tmp_path)


def test_missing_trainer_state_is_an_incomplete_checkpoint_not_a_world_size_change(tmp_path,
                                                                                   model):
    for s in (1, 2):
        save(tmp_path, s, model)
    newest = ckpt.list_checkpoints(tmp_path)[-1]
    (newest / "trainer_rank0.pt").unlink()
    warnings = []
    assert ckpt.resolve_resume("auto", tmp_path, warn=warnings.append).name == "step_00000001"
    assert "trainer_rank0.pt: missing" in warnings[0] and "incomplete" in warnings[0]
    with pytest.raises(CheckpointError) as err:
        ckpt.resolve_resume(str(newest), tmp_path)
    assert str(newest / "trainer_rank0.pt") in str(err.value) and "incomplete" in str(err.value)
    assert "world size" not in str(err.value)


def test_missing_file_of_another_rank_is_named_as_missing(tmp_path, model):
    """A 2-rank checkpoint whose rank-1 file is gone: rank 1 is told the file is missing."""
    save(tmp_path, 1, model, info=DistInfo(0, 2, 0, torch.device("cpu")))  # rank 0's share
    path = ckpt.list_checkpoints(tmp_path)[0]
    m, opt = model
    with pytest.raises(CheckpointError) as err:
        ckpt.load_checkpoint(path, DistInfo(1, 2, 1, torch.device("cpu")), m, opt)
    assert str(path / "trainer_rank1.pt") in str(err.value) and "incomplete" in str(err.value)
    assert "world size" not in str(err.value)


@pytest.mark.parametrize("world,ep_size", [(2, 1), (2, 2)])
def test_another_layout_resumes_but_a_foreign_optimizer_names_the_fresh_start(
        tmp_path, model, world, ep_size):
    """v4lab's optimizer reshards (`train.reshard`), so the start-up check accepts another
    layout; an optimizer that cannot (torch's AdamW here) is refused by name at load."""
    save(tmp_path, 1, model)
    assert ckpt.check_resume("auto", tmp_path, world, ep_size) is not None
    m, opt = model
    with pytest.raises(CheckpointError) as err:
        ckpt.load_checkpoint(ckpt.list_checkpoints(tmp_path)[0],
                             DistInfo(0, world, 0, torch.device("cpu")), m, opt)
    text = str(err.value)
    assert "written with world size 1, resuming with 2" in text
    for override in ("checkpoint.resume=none", "run_name=", "run_dir="):
        assert override in text
    assert "train.checkpoint" not in text and "load_weights" not in text


def test_checkpoint_of_another_model_gives_one_clear_error(tmp_path, model):
    from model.transformer import Transformer

    save(tmp_path, 1, model)
    path = ckpt.list_checkpoints(tmp_path)[0]
    assert ckpt.check_resume("auto", tmp_path, 1, 1, small_config()) == path  # same model: ok
    other = small_config(dim=96)
    for raise_it in (lambda: ckpt.check_resume("auto", tmp_path, 1, 1, other),  # at start-up
                     lambda: ckpt.load_weights(path / "model", Transformer(other), "cpu")):
        with pytest.raises(CheckpointError) as err:
            raise_it()
        text = str(err.value)
        assert str(path / "model") in text
        assert "embed.weight: checkpoint [256, 64] vs model [256, 96]" in text
        assert "dim: checkpoint 64 vs this run 96" in text
        assert "model.preset" in text and "checkpoint.resume=none" in text
        assert len(text.splitlines()) < 12  # a few examples, not one line per tensor


# ---------------------------------------------------------------------- the launcher
@pytest.fixture(scope="module")
def six_steps(tmp_path_factory, cache_dir):
    """A tiny run with a checkpoint at every step 1..6 (keep all)."""
    d = tmp_path_factory.mktemp("six")
    run(["steps=6", "checkpoint.every=1", "checkpoint.keep=0"], d, cache_dir)
    assert steps(d) == [1, 2, 3, 4, 5, 6]
    return d


def test_launcher_resume_from_older_step_keeps_the_new_branch(six_steps, tmp_path, cache_dir):  # noqa: E501
    d = tmp_path / "run"
    shutil.copytree(six_steps, d)
    older = ckpt.checkpoint_root(d) / "step_00000002"
    out = run(["steps=4", "checkpoint.every=1", "checkpoint.keep=1",
               f"checkpoint.resume={older}"], d, cache_dir)
    assert steps(d) == [4]  # what this run wrote survives pruning
    (aside,) = ckpt.checkpoint_root(d).glob("abandoned_*")
    assert sorted(p.name for p in aside.glob("step_*")) == [f"step_0000000{s}" for s in (3, 4, 5, 6)]
    assert "moved 4 later checkpoint(s)" in out.stderr
    assert ckpt.resolve_resume("auto", d).name == "step_00000004"


def test_launcher_skips_truncated_newest_checkpoint(six_steps, tmp_path, cache_dir):
    d = tmp_path / "run"
    shutil.copytree(six_steps, d)
    bad = ckpt.checkpoint_root(d) / "step_00000006" / "model" / "model.safetensors"
    truncate(bad)
    out = run(["steps=6", "checkpoint.every=1", "checkpoint.keep=0"], d, cache_dir)
    log = out.stdout + out.stderr
    assert f"skipping step_00000006: {bad}: truncated" in log
    assert "resumed from " in log and "step_00000005 at step 5" in log
    assert ckpt.checkpoint_problem(ckpt.checkpoint_root(d) / "step_00000006") is None  # rewritten
    (aside,) = ckpt.checkpoint_root(d).glob("abandoned_*")  # the bad one: set aside, not deleted
    assert [p.name for p in aside.glob("step_*")] == ["step_00000006"]


def test_launcher_resumes_at_another_layout(six_steps, tmp_path, cache_dir):
    """The 1-process run's step-3 checkpoint (ZeRO 0, EP 1) resumed by 2 processes with EP 2
    and whole-matrix ZeRO-3 (`train.reshard`; the blocks' dense weights then live on their
    owners only, gathered per block): weights, AdamW state, scheduler and data cursor carry
    over, so steps 4-6 see the same global batches and weights as the uninterrupted run.
    Their losses agree to 1e-4 relative: only the order of fp32 sums changed (measured: ~1e-6);
    a lost optimizer state (fresh moments) or a shifted data cursor moves them by > 1e-2."""
    d = tmp_path / "run"
    shutil.copytree(six_steps, d)
    (d / "metrics.jsonl").unlink()
    older = ckpt.checkpoint_root(d) / "step_00000003"
    out = run(["steps=6", "checkpoint.every=3", "parallel.ep_size=2", "parallel.zero_stage=3",
               f"checkpoint.resume={older}"], d, cache_dir, "deepspeed2", timeout=300)
    log = out.stdout + out.stderr
    assert "world size 1 -> 2, parallel.ep_size 1 -> 2, parallel.zero_stage 0 -> 3" in log
    full = {r["step"]: r["loss"] for r in map(json.loads, (six_steps / "metrics.jsonl")
                                                  .read_text().splitlines()) if "loss" in r}
    resumed = {r["step"]: r["loss"] for r in map(json.loads, (d / "metrics.jsonl")
                                                     .read_text().splitlines()) if "loss" in r}
    assert sorted(resumed) == [4, 5, 6]
    for s in resumed:
        assert abs(resumed[s] - full[s]) <= 1e-4 * abs(full[s]), (s, resumed[s], full[s])
