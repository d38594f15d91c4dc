"""The engine thread: every HTTP request of the server joins one continuous batch.

The rollout engine (`model/engine.py`) is stepped by one thread that owns it; request handlers
run on the asyncio event loop and only `submit` (queue a request, under the lock) and await
their events. A step runs under the same lock, so a request added while a step runs joins at
the next one. Events go back through `loop.call_soon_threadsafe`: ("token", tag, sample, id)
as each token is drawn (only for streaming requests) and ("done", tag, Finished) when all of a
request's samples have ended. If a step raises (a bug, memory), every request in flight gets
("error", tag, message), the engine is rebuilt, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Any, Callable

from model.generation import GenerationOutput


@dataclass
class Finished:
    output: GenerationOutput               # one row per sample
    top: list[list[tuple[list[int], list[float]]]]  # per sample, per token: top log-probs


@dataclass
class _Job:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    tag: Any

    def post(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


class EngineWorker:
    def __init__(self, make_engine: Callable[[], Any]):
        self.make_engine = make_engine
        self.engine = make_engine()
        self.cond = threading.Condition()
        self.jobs: dict[int, _Job] = {}
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="v4lab-engine", daemon=True)
        self.thread.start()

    def submit(self, queue: asyncio.Queue, tag: Any, prompt: list[int], stream: bool,
               **request) -> int:
        """Queues `prompt` (`Engine.add` keywords in `request`); its events go to `queue`
        tagged `tag`. Call from the event loop."""
        job = _Job(asyncio.get_running_loop(), queue, tag)
        on_token = (lambda sample, token: job.post("token", tag, sample, token)) if stream \
            else None
        with self.cond:
            rid = self.engine.add(prompt, on_token=on_token, **request)
            self.jobs[rid] = job
            self.cond.notify()
        return rid

    def cancel(self, rid: int) -> None:
        """The client went away: its rows leave the batch at the next step."""
        with self.cond:
            if rid in self.jobs:
                self.engine.cancel(rid)
                self.cond.notify()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.engine.busy and not self.closed:
                    self.cond.wait()
                if self.closed:
                    return
                done = self._step()
            for job, finished in done:
                job.post("done", job.tag, finished)

    def _step(self) -> list[tuple[_Job, Finished]]:
        """One engine step (lock held): the jobs that finished, with their outputs."""
        try:
            with self.engine.inference():
                finished = self.engine.step()
        except Exception as error:  # noqa: BLE001 - fail the requests in flight, keep serving
            for job in self.jobs.values():
                job.post("error", job.tag, f"generation failed: {type(error).__name__}: "
                                           f"{error}")
            self.jobs.clear()
            self.engine = self.make_engine()
            return []
        out = []
        for rid in finished:
            job = self.jobs.pop(rid, None)
            result = Finished(self.engine.output(rid), self.engine.top_logprobs(rid))
            self.engine.release(rid)
            if job is not None:
                out.append((job, result))
        return out
