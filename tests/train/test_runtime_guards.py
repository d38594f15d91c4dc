"""The trainer's runtime guards in-process (fast): the end of a run never hides the error that
ended it, the loss-curve plot is atomic and optional, a failed save says where and how much space
is left, launcher death is noticed, and a resumed LR schedule is the config's."""

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch

from optim.schedule import LRSchedule, make_scheduler
from train import guards
from train.dist import LauncherWatch
from train.metrics import MetricsLogger
from train.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]


def logger(run_dir):
    log = MetricsLogger(run_dir, True, 3, 0, SimpleNamespace(mode="disabled"), {},
                        progress=False)
    for step in (1, 2, 3):
        log.log(step, {"loss": 5.0 - step})
    return log


def _full_disk_savefig(self, fname, *args, **kwargs):
    """What a write on a full filesystem does: the file is created, then the write fails."""
    if isinstance(fname, (str, os.PathLike)):
        open(fname, "wb").close()
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_plot_on_a_full_disk_leaves_no_truncated_png_and_does_not_raise(tmp_path, monkeypatch,
                                                                      capsys):
    logger(tmp_path).close()  # a good plot from an earlier end of run
    good = (tmp_path / "loss_curve.png").read_bytes()
    assert good[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.figure

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", _full_disk_savefig)
    log = logger(tmp_path)
    log.close()  # must not raise: the metrics are safe, only the picture is missing
    out = capsys.readouterr().out
    assert "loss_curve.png not written" in out and "No space left" in out, out
    assert (tmp_path / "loss_curve.png").read_bytes() == good  # replaced atomically or not at all
    assert [p.name for p in tmp_path.iterdir() if "loss_curve" in p.name] == ["loss_curve.png"]
    assert log.file.closed
    # the second run started at step 0 again: the first run's rows were set aside, not lost
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    assert len((tmp_path / "metrics.superseded.jsonl").read_text().splitlines()) == 3


def test_missing_matplotlib_warns_instead_of_crashing(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` → ImportError
    log = logger(tmp_path)
    log.close()
    assert "pip install matplotlib" in capsys.readouterr().out
    assert log.file.closed and not (tmp_path / "loss_curve.png").exists()


def test_finish_is_best_effort_while_an_error_propagates(capsys):
    ran = []

    def failing(name):
        def fn():
            ran.append(name)
            raise OSError(errno.ENOSPC, f"{name}: no space")
        return fn

    steps = [("closing the loader", failing("loader")), ("the plot", failing("plot"))]
    guards.finish(steps, ValueError("the real error"))  # reported, not raised
    err = capsys.readouterr().err
    assert ran == ["loader", "plot"]
    assert "the real error" in err and "the plot also failed" in err and "plot: no space" in err
    ran.clear()
    with pytest.raises(OSError, match="loader: no space"):  # no error yet: the first one raises
        guards.finish(steps, None)
    assert ran == ["loader", "plot"]  # ... after every step ran


def test_save_failure_names_the_path_and_the_free_space(tmp_path):
    target = tmp_path / "checkpoints" / "step_00000007"  # not created yet: its parent is probed
    msg = guards.save_failure(target, 7, RuntimeError("PytorchStreamWriter failed writing file"))
    assert str(target) in msg and "step 7" in msg and "PytorchStreamWriter" in msg
    assert "GiB free of" in msg and str(tmp_path) in msg


def test_non_finite_weights_are_named():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    model.register_buffer("bias_buffer", torch.zeros(2))
    assert guards.non_finite_tensors(model) == []
    with torch.no_grad():
        model[1].weight[0] = float("inf")
    model.bias_buffer[1] = float("nan")
    assert guards.non_finite_tensors(model) == ["1.weight", "bias_buffer"]
    with pytest.raises(guards.NonFiniteError, match=r"in checkpoint x: 1\.weight, bias_buffer"):
        guards.check_finite_weights(model, "in checkpoint x", torch.device("cpu"))


def test_launcher_watch_notices_exit_and_zombies():
    assert LauncherWatch.for_launched(False).gone() is None  # plain python watches nothing
    assert LauncherWatch.for_launched(True).gone() is None  # our parent is alive
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        watch = LauncherWatch(None, [(proc.pid, psutil.Process(proc.pid).create_time(), "x")])
        assert watch.gone() is None
        proc.kill()
        for _ in range(100):  # not reaped yet: a zombie counts as gone
            if psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE:
                break
            time.sleep(0.05)
        assert f"launcher process {proc.pid}" in (watch.gone() or "")
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert watch.gone() is not None  # reaped: no such process


RANK = """
import json
from train.dist import LauncherWatch
w = LauncherWatch.for_launched(True)
print(json.dumps([w.ppid, [pid for pid, _, _ in w.watched]]))
"""
# stands in for `deepspeed.launcher.launch` (the marker is in its argv) spawning one rank
LAUNCH = ("import subprocess, sys; sys.exit(subprocess.call([sys.executable, '-c', sys.argv[1]]))")


def test_launcher_watch_under_deepspeed_watches_launch_and_runner():
    runner = ("import os, subprocess, sys; print(os.getpid(), flush=True); "
              "sys.exit(subprocess.call([sys.executable, '-c', sys.argv[1], sys.argv[2], "
              "'deepspeed.launcher.launch']))")
    out = subprocess.run([sys.executable, "-c", runner, LAUNCH, RANK], cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    runner_pid, result = out.stdout.splitlines()
    ppid, watched = json.loads(result)
    assert watched == [ppid, int(runner_pid)]


def test_resume_keeps_this_configs_lr_schedule():
    param = torch.nn.Parameter(torch.zeros(1))
    old = torch.optim.SGD([param], lr=2.0)
    sched = make_scheduler(old, LRSchedule(10, 2, 4))
    for _ in range(3):
        old.step()
        sched.step()
    new_schedule = LRSchedule(20, 2, 4)  # the resumed run asks for more steps
    opt = torch.optim.SGD([param], lr=2.0)
    trainer = SimpleNamespace(schedule=new_schedule, optimizer=opt,
                              scheduler=make_scheduler(opt, new_schedule),
                              info=SimpleNamespace(is_main=False))
    Trainer.load_scheduler(trainer, sched.state_dict())
    assert new_schedule.total_steps == 20  # not overwritten in place by the checkpoint's
    assert trainer.scheduler.last_epoch == 3
    assert opt.param_groups[0]["lr"] == 2.0 * new_schedule(3)
    assert trainer.scheduler.get_last_lr() == [2.0 * new_schedule(3)]


def test_first_non_finite_eval_stops_and_a_later_one_is_reported():
    messages = []
    trainer = SimpleNamespace(model=torch.nn.Linear(2, 2), info=SimpleNamespace(
        device=torch.device("cpu")), step=4, evals_this_run=0,
                              logger=SimpleNamespace(message=messages.append))
    nan = {"val_loss": float("nan"), "val_bpb": float("nan")}
    with pytest.raises(guards.NonFiniteError, match=r"first held-out loss .* \(step 4\)"):
        Trainer.check_eval(trainer, nan)
    Trainer.check_eval(trainer, {"val_loss": 1.0, "val_bpb": 1.0})
    Trainer.check_eval(trainer, nan)  # after a finite one: reported, training goes on
    assert messages == ["step 4: held-out loss is non-finite ({'val_loss': nan})"]
    with torch.no_grad():
        trainer.model.weight[0, 0] = float("nan")
    with pytest.raises(guards.NonFiniteError, match=r"non-finite weights .* weight"):
        Trainer.check_eval(trainer, nan)  # garbage weights always stop


def test_replayed_tokens_of_old_checkpoints_match_the_ramp():
    """The tokens an old checkpoint (no `tokens_seen`) consumed, replayed from the config:
    the values the ramp e2e run logs (2 → 8 sequences over 2560 tokens, seq 128 then 64)."""
    from train.recipe import RecipeSchedule

    stages = [SimpleNamespace(step=3, seq_len=64)]
    cfg = SimpleNamespace(batch=SimpleNamespace(ramp_start=2, global_batch=8, ramp_tokens=2560,
                                                per_stage="sequences"),
                          data=SimpleNamespace(micro_batch=2, seq_len=128),
                          recipe=SimpleNamespace(seq_len_stages=stages, csa_dense_until=0,
                                                 indexer_warmup_steps=0, mtp_weight=0.3,
                                                 mtp_weight_after_decay=0.1))
    trainer = SimpleNamespace(cfg=cfg, info=SimpleNamespace(world=1), dp_world=1,
                              stage=RecipeSchedule(cfg, None, decay_start=10))
    assert [Trainer.replay_tokens(trainer, n) for n in range(7)] == \
        [0, 256, 512, 768, 896, 1152, 1408]
