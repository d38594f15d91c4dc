"""The pipeline under signals and a second writer, in real processes.

SIGTERM or Ctrl-C (SIGINT) to `python -m pipeline` reaches every running stage (stages run in
sessions of their own, so nothing else would), the pipeline waits for their checkpoints, starts
nothing new, names what it stopped and exits 128 + the signal; no stage outlives it. A second
pipeline on the same folder is refused naming the holder's PID.

The stand-in stages behave like the trainers: on SIGTERM they write a checkpoint (a file) after
a short delay, then exit 143.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from train.run_lock import RunLock

REPO = Path(__file__).resolve().parents[2]

STAGE = """
import os, pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1])
def stop(signum, frame):
    time.sleep(0.5)                       # a checkpoint takes a moment
    (out / f"{NAME}.ckpt").write_text("saved")
    sys.exit(128 + signum)
signal.signal(signal.SIGTERM, stop)
(out / f"{NAME}.pid").write_text(str(os.getpid()))
time.sleep(120)
"""

DRIVER = """
import sys
from pathlib import Path
from types import SimpleNamespace
from pipeline.__main__ import run_locked
from pipeline.stages import Stage

out = Path(sys.argv[1])
class Scripted(Stage):
    def __init__(self, name, code, needs=()):
        super().__init__(name, "eval", out, needs=needs, output=out / f"{name}.done")
        self.code = code
    def command(self, launcher, nproc):
        return [sys.executable, "-c", self.code, str(out)]
stage = open(sys.argv[2]).read()
stages = [Scripted("a", stage.replace("NAME", "'a'")), Scripted("b", stage.replace("NAME", "'b'")),
          Scripted("after", "pass", needs=("a", "b"))]
cfg = SimpleNamespace(name="t", jobs=2, launcher="python", nproc=1, stage_timeout=300)
sys.exit(run_locked(cfg, out, stages))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_every_stage_with_a_checkpoint_and_exits_nonzero(tmp_path, sig):
    (tmp_path / "stage.py").write_text(STAGE)
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path),
                             str(tmp_path / "stage.py")], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids = [tmp_path / "a.pid", tmp_path / "b.pid"]
    deadline = time.time() + 60
    while not all(p.exists() and p.read_text() for p in pids):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    stages = [int(p.read_text()) for p in pids]
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert re.fullmatch(rf"stopped: {signal.Signals(sig).name}: stages (a, b|b, a) stopped with "
                        r"a checkpoint; run the same command again to resume",
                        err.strip().splitlines()[-1]), err
    for name in ("a", "b"):
        assert (tmp_path / f"{name}.ckpt").read_text() == "saved"
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"
                   for pid in stages)
    assert not (tmp_path / "logs" / "after.log").exists()  # nothing new started


def test_a_second_pipeline_on_the_same_folder_is_refused(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    with RunLock(tmp_path / "recipe"):
        out = subprocess.run([sys.executable, "-m", "pipeline", f"out_dir={tmp_path / 'recipe'}"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith(
        f"error: pipeline folder {tmp_path / 'recipe'} is in use by pid {os.getpid()}"), out.stderr
    assert not (tmp_path / "recipe" / "logs").exists()
