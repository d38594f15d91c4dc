"""`python bench/gpu_check.py`, the prepared GPU check, kept from rotting between GPU visits:
every section at toy sizes on the CPU (the Triton kernels through the interpreter), the files it
must leave behind, and the runner's guarantees (a failing section is recorded and the next one
runs; what no longer fits the budget is skipped, not started)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_check.py"
SECTIONS = ["env", "correctness", "kernel_speed", "train_step", "generation", "newton_schulz"]


def load_runner():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_section_runs_at_toy_sizes_on_the_cpu(tmp_path):
    out = tmp_path / "check"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--out",
                           str(out), "--budget-s", "400"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    summary = (out / "summary.md").read_text()
    assert done.returncode == 0, summary + done.stderr[-3000:]
    for i, name in enumerate(SECTIONS, 1):
        result = json.loads((out / f"{i}_{name}.json").read_text())
        assert result["rows"] and not result["failed"], (name, result["failed"])
        assert (out / f"{i}_{name}.md").read_text().startswith("### ")
    correctness = json.loads((out / "2_correctness.json").read_text())
    checked = " ".join(row[0] for row in correctness["rows"])
    for kernel in ("rms_norm", "swiglu", "mhc", "sparse_attention", "experts", "permute",
                   "fp8_block_quant", "model tiny fwd+bwd"):
        assert kernel in checked, kernel
    assert all(row[-1] == "PASS" for row in correctness["rows"])
    assert "## Failed or skipped\n\n- nothing" in summary


def test_a_failing_section_is_recorded_and_the_budget_skips_the_rest(tmp_path, monkeypatch):
    runner = load_runner()
    ran = []

    class Boom:
        @staticmethod
        def run(ctx):
            ran.append("boom")
            raise RuntimeError("no such backend")

    class Fine:
        @staticmethod
        def run(ctx):
            ran.append("fine")
            r = runner.Result("Fine", ["a"])
            r.add(1)
            return r

    monkeypatch.setattr(runner, "SECTIONS", {"env": Boom, "correctness": Fine})
    code = runner.main(["--device", "cpu", "--tiny", "--out", str(tmp_path / "a"),
                        "--sections", "env", "correctness"])
    assert code == 1 and ran == ["boom", "fine"]
    summary = (tmp_path / "a" / "summary.md").read_text()
    assert "env: RuntimeError: no such backend" in summary and "### Fine" in summary
    assert json.loads((tmp_path / "a" / "2_correctness.json").read_text())["rows"] == [[1]]
    ran.clear()
    code = runner.main(["--device", "cpu", "--tiny", "--out", str(tmp_path / "b"),
                        "--budget-s", "1", "--sections", "env", "correctness"])
    assert code == 1 and ran == []  # nothing starts with less than MIN_START_S left
    assert "env: skipped (budget)" in (tmp_path / "b" / "summary.md").read_text()


def test_no_gpu_is_one_clear_error(tmp_path):
    if __import__("torch").cuda.is_available():
        return
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2 and done.stderr.startswith("error: --device cuda")
    assert "Traceback" not in done.stderr
