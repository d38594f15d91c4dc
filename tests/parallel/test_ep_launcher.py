"""`deepspeed --num_gpus 2 train/pretrain.py parallel.ep_size=2` end to end on the CPU: it
trains, logs the EP metrics, writes full expert stacks, and bad EP settings fail before any
allocation with the config field named."""

from __future__ import annotations

import json

import pytest
from tests.helpers.weights import read_weights

from tests.train.test_pretrain_e2e import run

pytest.importorskip("deepspeed")


def test_deepspeed_launcher_ep2(tmp_path, cache_dir):
    run(["steps=3", "parallel.ep_size=2", "checkpoint.every=3"], tmp_path, cache_dir,
        "deepspeed2", timeout=300)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert r["ep/all_to_all_bytes"] > 0 and r["ep/dispatch_seconds"] > 0
        assert r["ep/load_rank0"] + r["ep/load_rank1"] == pytest.approx(1.0)
    w = read_weights(tmp_path / "checkpoints" / "step_00000003" / "model")  # both ranks wrote
    assert w["layers.2.ffn.experts.w1"].shape[0] == 8          # gathered from both ranks
    # the two halves were trained on different ranks but both moved away from the init
    assert w["layers.2.ffn.gate.bias"].abs().sum() > 0


@pytest.mark.parametrize("override,message", [
    ("parallel.ep_size=3", "parallel.ep_size=3 must divide"),
    ("parallel.ep_size=16", "parallel.ep_size=16 must divide"),
])
def test_bad_ep_size_fails_before_allocation(tmp_path, cache_dir, override, message):
    out = run(["steps=1", override], tmp_path, cache_dir, check=False, timeout=120)
    assert out.returncode != 0
    assert message in out.stdout + out.stderr
