"""One writer per run directory (`train/run_lock.py`): a second writer is refused naming the
holder's PID, the lock dies with its holder (kill -9 included), and the trainer refuses a locked
run directory before any model or data work."""

import os
import signal
import subprocess
import sys
import time

import pytest

from train.run_lock import RunDirLocked, RunLock

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HOLD = ("import sys, time; from train.run_lock import RunLock; RunLock(sys.argv[1]).acquire(); "
        "print('held', flush=True); time.sleep(600)")


def _holder(directory):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_is_refused_with_the_holders_pid(tmp_path):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(RunDirLocked, match=rf"in use by pid {holder.pid} on "):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_holders_lock_is_taken_over(tmp_path):
    holder = _holder(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)  # no clean-up runs: the lock file stays behind
    holder.wait()
    assert (tmp_path / ".lock").read_text().startswith(f"pid {holder.pid}")
    with RunLock(tmp_path):
        assert (tmp_path / ".lock").read_text().startswith(f"pid {os.getpid()}")
    with RunLock(tmp_path):  # released on exit: taken again
        pass


def test_trainer_refuses_a_locked_run_directory(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "disabled"}
    with RunLock(tmp_path):
        start = time.time()
        out = subprocess.run([sys.executable, "train/pretrain.py", f"run_dir={tmp_path}",
                              "steps=1"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=300)
    assert out.returncode == 1, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: run directory {tmp_path} is in use by pid "
                                f"{os.getpid()}"), out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "config.yaml").exists()
    assert time.time() - start < 120
