"""Context parallelism through the pre-training launcher, in real processes (torchrun, gloo):
CP = 2 composed with EP = 2 and whole-matrix ZeRO-2 trains the same losses as one process at
CP = 1 on the same global batch; a CP run resumes bitwise in its own layout; a CP = 2 checkpoint
continues at CP = 1 (resharded like any world-size change); and bad layouts stop at start-up
with one line naming the key and a value that works.

Tolerance for CP against one process: the same fp32 math in another summation order (module
doc of tests/parallel/test_context_parallel.py: ~1e-6 relative in the loss of one forward), then
four AdamW steps; measured agreement 3e-6 relative, asserted 1e-4.
"""

import json
import re
import shutil
from pathlib import Path

import pytest

from .test_pretrain_e2e import run

CP2 = ["parallel.cp_size=2", "parallel.ep_size=2", "parallel.zero_stage=2"]


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_cp2_with_ep2_zero2_trains_like_one_process_resumes_and_continues_at_cp1(tmp_path,
                                                                                 cache_dir):
    steps = ["steps=4", "checkpoint.every=2"]
    ref, cp = tmp_path / "ref", tmp_path / "cp"
    run(steps, ref, cache_dir)
    run(steps + CP2, cp, cache_dir, "torchrun2")
    one, two = losses(ref), losses(cp)
    assert sorted(two) == [1, 2, 3, 4]
    for s in one:
        assert two[s] == pytest.approx(one[s], rel=1e-4), (s, one, two)
    metrics = [json.loads(x) for x in (cp / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["tokens_seen"] == one_step_tokens(ref)  # whole rows counted once

    # its own layout: bitwise
    again = tmp_path / "again"
    (again / "checkpoints").mkdir(parents=True)
    shutil.copytree(cp / "checkpoints" / "step_00000002", again / "checkpoints" / "step_00000002")
    run(steps + CP2, again, cache_dir, "torchrun2")
    assert losses(again) == {3: two[3], 4: two[4]}

    # CP = 2 (world 2, EP 2) → CP = 1 (world 1): resharded, the same run continues
    single = tmp_path / "single"
    (single / "checkpoints").mkdir(parents=True)
    shutil.copytree(cp / "checkpoints" / "step_00000002", single / "checkpoints" / "step_00000002")
    out = run(steps + ["parallel.zero_stage=2"], single, cache_dir)
    assert "resharding" in out.stdout
    cont = losses(single)
    assert sorted(cont) == [3, 4]
    for s in cont:
        assert cont[s] == pytest.approx(two[s], rel=1e-4), (s, cont, two)


def one_step_tokens(run_dir: Path) -> int:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r["tokens_seen"] for r in rows if "loss" in r)


@pytest.mark.parametrize("args, launcher, message", [
    (["parallel.cp_size=3"], "python",
     "parallel.cp_size=3 must divide the world size 1 (world = data-parallel x cp); choose one "
     "of [1]"),
    (["parallel.cp_size=2", "data.seq_len=130"], "torchrun2",
     "sequence length 130 is not a multiple of 2 x parallel.cp_size = 4"),
    (["parallel.cp_size=2", "data.seq_len=48"], "torchrun2",
     "parallel.cp_size=2 cuts sequence length 48 into chunks of 12 tokens, shorter than the 16 "
     "an attention halo needs"),
])
def test_bad_layouts_stop_with_one_line(tmp_path, cache_dir, args, launcher, message):
    out = run(["steps=1"] + args, tmp_path / "bad", cache_dir, launcher, check=False,
              timeout=300)
    assert out.returncode != 0
    assert message in out.stderr + out.stdout
    # no frame of ours (torchrun adds its own report of the failed child)
    assert not re.search(r'File "[^"]*/(train|model|data)/[^"]+", line', out.stderr)


def test_stage_the_layout_cannot_run_checkpoints_names_cp_and_resumes_in_it(tmp_path, cache_dir):
    """Sequences of 128 at CP = 2, then from step 2 sequences of 32 (chunks of 8, shorter than
    the tiny model's 16-token halo): the run checkpoints step 2 and stops naming cp_size=1;
    resumed at CP = 1 it trains the new stage with the tokens per step kept (4 x 128 = 16 x 32,
    `batch.per_stage=tokens`)."""
    stages = ["steps=4", "checkpoint.every=0", "+recipe.seq_len_stages=[{step: 0, seq_len: 128},"
              " {step: 2, seq_len: 32}]"]
    run_dir = tmp_path / "staged"
    out = run(stages + ["parallel.cp_size=2"], run_dir, cache_dir, "torchrun2", check=False)
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "step 2: the stage of 32-token sequences cannot run with parallel.cp_size=2" in text
    assert "resume with parallel.cp_size=1" in text
    assert (run_dir / "checkpoints" / "step_00000002").is_dir()
    run(stages + ["parallel.cp_size=1"], run_dir, cache_dir, "torchrun2")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    seen = {r["step"]: (r["tokens_seen"], r["global_batch"], r["seq_len"]) for r in rows
            if "loss" in r}
    assert seen == {1: (512, 4, 128), 2: (1024, 4, 128), 3: (1536, 16, 32), 4: (2048, 16, 32)}
