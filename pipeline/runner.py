"""Runs the stages: each as soon as the stages it reads are complete, `jobs` at a time.

A stage's output goes to `<out_dir>/logs/<stage>.log`; the console gets one line when it starts
and one when it ends. What each stage cost is kept in `<out_dir>/stages.json` (written
atomically after every stage), so a re-run that skips finished stages still reports their time.
When a stage fails, the running ones get SIGTERM (the trainer saves a checkpoint and stops, so
nothing is lost), and the error names the stage, its exit status, its log and the log's tail.

Signals: SIGTERM or SIGINT (Ctrl-C) to the pipeline is forwarded to every running stage's
process group (stages run in sessions of their own, so a terminal's Ctrl-C reaches only the
pipeline); no new stage starts, the runner waits for the stages to write their checkpoints and
raises `PipelineStopped` naming them. A second signal kills the stages at once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from data.cache import atomic_write_text

from .stages import Stage


class StageFailed(RuntimeError):
    pass


class PipelineStopped(RuntimeError):
    def __init__(self, signum: int, stopped: list[str]):
        self.signum, self.stopped = signum, stopped
        name = signal.Signals(signum).name
        what = (f"stages {', '.join(stopped)} stopped with a checkpoint" if stopped else
                "no stage was running")
        super().__init__(f"{name}: {what}; run the same command again to resume")


def stage_env(jobs: int) -> dict[str, str]:
    """The stages' environment: unbuffered output, and (unless the user chose) the CPU's
    threads shared among the stages that run at once instead of each taking them all."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    return env


class Runner:
    def __init__(self, out_dir: Path, launcher: str, nproc: int, jobs: int, timeout: float):
        self.out_dir, self.launcher, self.nproc = Path(out_dir), launcher, nproc
        self.jobs, self.timeout = jobs, timeout
        self.record_path = self.out_dir / "stages.json"
        self.record: dict[str, Any] = (json.loads(self.record_path.read_text())
                                       if self.record_path.is_file() else {})
        self.lock = threading.RLock()  # re-entrant: the signal handler runs on the main thread
        self.procs: dict[str, subprocess.Popen] = {}
        self.stopping: int | None = None  # the signal that stops the run
        self.env = stage_env(jobs)

    def run(self, stages: list[Stage]) -> None:
        names = {s.name for s in stages}
        for s in stages:
            missing = [n for n in s.needs if n not in names]
            if missing:
                raise ValueError(f"stage {s.name} needs {missing}, which are not in the plan")
        finished: set[str] = set()
        pending = list(stages)
        running: dict[Future, Stage] = {}
        stopped: list[str] = []
        handlers = {sig: signal.signal(sig, self.on_signal)
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            with ThreadPoolExecutor(self.jobs) as pool:
                while pending or running:
                    if not self.stopping:
                        self.start_ready(pool, pending, finished, running)
                    if not running:
                        if pending and not self.stopping:  # build_stages' order prevents it
                            raise StageFailed(f"stages {[s.name for s in pending]} wait on "
                                              f"stages that never finish")
                        break
                    done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                    for future in done:
                        stage = running.pop(future)
                        try:
                            future.result()
                        except BaseException:
                            if self.stopping:  # stopped by our forwarded signal
                                stopped.append(stage.name)
                                continue
                            self.stop_all()
                            wait(list(running))
                            raise
                        finished.add(stage.name)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        if self.stopping:
            raise PipelineStopped(self.stopping, stopped)

    def start_ready(self, pool: ThreadPoolExecutor, pending: list[Stage], finished: set[str],
                    running: dict[Future, Stage]) -> None:
        self.skip_complete(pending, finished)
        for s in [s for s in pending if all(n in finished for n in s.needs)]:
            if len(running) < self.jobs:
                pending.remove(s)
                running[pool.submit(self.run_one, s)] = s

    def on_signal(self, signum: int, frame) -> None:
        first = self.stopping is None
        self.stopping = self.stopping or signum
        with self.lock:
            names = ", ".join(self.procs) or "none"
        if first:
            log(f"{signal.Signals(signum).name}: stopping the running stages ({names}); each "
                f"saves a checkpoint (signal again to kill them)")
            self.stop_all()
        else:
            log(f"{signal.Signals(signum).name} again: killing the running stages ({names})")
            self.stop_all(signal.SIGKILL)

    def skip_complete(self, pending: list[Stage], finished: set[str]) -> None:
        """Marks finished every ready stage whose output exists, until none is left (a skipped
        stage can make the next one ready)."""
        ready = [s for s in pending if all(n in finished for n in s.needs) and s.done()]
        while ready:
            for s in ready:
                pending.remove(s)
                finished.add(s.name)
                self.note(s, status="complete")
            ready = [s for s in pending if all(n in finished for n in s.needs) and s.done()]

    def run_one(self, stage: Stage) -> None:
        t0 = time.time()
        log(f"start {stage.name}" + ("" if stage.fn else f"  (log {self.log_path(stage)})"))
        if stage.prepare is not None:
            stage.prepare()
        if stage.fn is not None:
            stage.fn()
        else:
            self.run_until_done(stage)
        if stage.finish is not None:
            stage.finish()
        if not stage.done():
            raise StageFailed(f"stage {stage.name} exited cleanly but left no "
                              f"{stage.output or stage.checkpoint}; see {self.log_path(stage)}")
        seconds = time.time() - t0
        self.note(stage, status="ran", seconds=seconds, started=t0)
        log(f"done  {stage.name} in {seconds / 60:.1f} min")

    def run_until_done(self, stage: Stage) -> None:
        """The stage's command; when it exits non-zero and its `retry` names stages to run
        first (GRPO outside the band: train the SFT expert further), those, then it again."""
        while True:
            code = self.run_command(stage)
            if code == 0:
                return
            before = stage.retry(code) if stage.retry is not None and not self.stopping else None
            if before is None:
                path = self.log_path(stage)
                tail = "".join(path.read_text(errors="replace").splitlines(True)[-25:])
                raise StageFailed(f"stage {stage.name} failed (exit status {code}); log {path}; "
                                  f"its end:\n{tail}")
            for other in before:
                log(f"{stage.name} exited {code}: running {other.name} first "
                    f"(to step {other.steps})")
                t0 = time.time()
                self.run_until_done(other)
                self.note_extension(other, time.time() - t0)

    def run_command(self, stage: Stage) -> int:
        """Runs the stage's command to its end; -> its exit status."""
        path = self.log_path(stage)
        path.parent.mkdir(parents=True, exist_ok=True)
        cmd = stage.command(self.launcher, self.nproc)
        with open(path, "a") as out:
            out.write(f"$ {' '.join(cmd)}\n")
            out.flush()
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                    start_new_session=True)
            with self.lock:
                self.procs[stage.name] = proc
            try:
                return proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                _signal(proc, signal.SIGTERM)
                proc.wait()
                raise StageFailed(f"stage {stage.name} ran past stage_timeout="
                                  f"{self.timeout:g}s and was stopped; see {path}") from None
            finally:
                with self.lock:
                    self.procs.pop(stage.name, None)

    def stop_all(self, sig: int = signal.SIGTERM) -> None:
        with self.lock:
            for proc in self.procs.values():
                _signal(proc, sig)

    def log_path(self, stage: Stage) -> Path:
        return self.out_dir / "logs" / f"{stage.name.replace('/', '_')}.log"

    def note_extension(self, stage: Stage, seconds: float) -> None:
        """A finished stage trained further (an SFT expert extended for GRPO's band): its wall
        time grows by the extension's, and the extensions are counted."""
        with self.lock:
            entry = self.record.setdefault(stage.name, {})
            entry["seconds"] = entry.get("seconds", 0.0) + seconds
            entry["extensions"] = entry.get("extensions", 0) + 1
            atomic_write_text(self.record_path, json.dumps(self.record, indent=2))

    def note(self, stage: Stage, **fields: Any) -> None:
        """Keeps the latest run's cost of each stage; a skipped stage keeps its old figures."""
        with self.lock:
            entry = self.record.setdefault(stage.name, {})
            if fields.get("status") == "complete" and entry:
                return
            entry.update(fields, kind=stage.kind, run_dir=str(stage.run_dir))
            atomic_write_text(self.record_path, json.dumps(self.record, indent=2))


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the launcher and every rank it started
    except ProcessLookupError:
        pass


_PRINT = threading.RLock()  # re-entrant: a signal handler may log while the main thread does


def log(message: str) -> None:
    """One whole line per message: stages start and end on several threads at once."""
    with _PRINT:
        sys.stdout.write(f"[{time.strftime('%H:%M:%S')}] {message}\n")
        sys.stdout.flush()
